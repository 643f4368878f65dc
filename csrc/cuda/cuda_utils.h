// Small helpers shared by the CUDA host wrappers.
#pragma once

#include <torch/types.h>

#include "message.h"

#include "s2o/params.h"

namespace s2o {

// The kernels load rows in 16-byte chunks: the last dimension must be contiguous and rows 16-byte
// aligned. Returns the tensor itself when it already is, else a contiguous copy.
inline at::Tensor with_aligned_rows(const at::Tensor& t) {
  const bool aligned = t.stride(-1) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 &&
                       t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0;
  return aligned ? t : t.contiguous();
}

inline TensorStrides strides_of(const at::Tensor& t) {  // t: [B, H, N, D], stride(3) == 1
  return TensorStrides{t.stride(0), t.stride(1), t.stride(2)};
}

inline void check_cuda_tensor(const at::Tensor& t, const char* name) {
  S2O_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
}

// The head dims the CUDA kernels are built for (kCudaHeadDims; cuda_dispatch.h instantiates them).
static_assert(sizeof(kCudaHeadDims) / sizeof(kCudaHeadDims[0]) == 2 && kCudaHeadDims[0] == 64 &&
                  kCudaHeadDims[1] == 128,
              "S2O_DISPATCH_HEAD_DIM instantiates head dims 64 and 128");
inline void check_cuda_head_dim(int64_t head_dim) {
  S2O_CHECK(head_dim == kCudaHeadDims[0] || head_dim == kCudaHeadDims[1],
            "query head dim must be ", kCudaHeadDims[0], " or ", kCudaHeadDims[1],
            " on CUDA, got ", head_dim);
}

}  // namespace s2o
