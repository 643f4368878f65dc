// Definition of launch_sparse_attention, included by the files under instantiations/.
#pragma once

#include <c10/cuda/CUDAException.h>

#include "s2o/sparse_attention.cuh"
#include "sparse_attention_launch.h"

namespace s2o {

template <typename Element, int kHeadDim, int kRows>
void launch_sparse_attention(const SparseAttentionParams& p, cudaStream_t stream) {
  using Traits = SparseAttentionTraits<Element, kHeadDim, kRows>;
  auto kernel = sparse_attention_kernel<Traits>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      Traits::kSmemBytes));
  const dim3 grid(unsigned(p.num_q_tiles), unsigned(p.units), unsigned(p.batch));
  kernel<<<grid, Traits::kThreads, Traits::kSmemBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace s2o
