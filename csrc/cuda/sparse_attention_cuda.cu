// CUDA host wrapper of s2o::sparse_attention (csrc/include/s2o/sparse_attention.cuh).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <string>

#include "checks.h"
#include "message.h"
#include "cuda_dispatch.h"
#include "cuda_utils.h"
#include "ops.h"
#include "sparse_attention_launch.h"

namespace s2o {
namespace {

// Which attention kernel runs: the wgmma kernel on Hopper when the build has sm_90a code, else the
// mma.sync kernel. S2O_ATTENTION_KERNEL=sm80 forces the mma.sync kernel (on any GPU), =sm90 the
// wgmma kernel (an error where it cannot run); read on every call so that tests and benchmarks
// can compare the two in one process.
bool use_wgmma_kernel(int device) {
#if defined(S2O_WITH_SM90A)
  constexpr bool built = true;
#else
  constexpr bool built = false;
#endif
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  const bool hopper = major == 9 && minor == 0;
  const char* choice = std::getenv("S2O_ATTENTION_KERNEL");
  const std::string kernel = choice == nullptr ? "auto" : choice;
  if (kernel == "sm80") return false;
  if (kernel == "sm90") {
    S2O_CHECK(built, "S2O_ATTENTION_KERNEL=sm90: this build of s2o has no sm_90a code (build with "
              "TORCH_CUDA_ARCH_LIST containing 9.0a)");
    S2O_CHECK(hopper, "S2O_ATTENTION_KERNEL=sm90 needs a compute capability 9.0 GPU, got ",
              major, ".", minor);
    return true;
  }
  S2O_CHECK(kernel == "auto" || kernel.empty(),
            "S2O_ATTENTION_KERNEL must be auto, sm80 or sm90, got '", kernel, "'");
  return built && hopper;
}

void sparse_attention_cuda(const SparseAttentionCall& call) {
  check_cuda_tensor(call.query, "query");
  check_cuda_head_dim(call.query.size(3));
  S2O_CHECK(call.block_n == kCudaBlockN, "the CUDA kernel takes block_n=", kCudaBlockN, ", got ",
            call.block_n);
  const int64_t unit_rows = call.units.unit_heads * call.block_m;
  S2O_CHECK(unit_rows <= kCudaMaxUnitRows, "the CUDA kernel takes work units of at most ",
            kCudaMaxUnitRows, " rows: block_m (", call.block_m, ") x query heads per unit (",
            call.units.unit_heads, ") = ", unit_rows);
  const c10::cuda::CUDAGuard guard(call.query.device());
  const at::Tensor query = with_aligned_rows(call.query), key = with_aligned_rows(call.key),
                   value = with_aligned_rows(call.value);
  SparseAttentionParams p{};
  p.batch = int(query.size(0));
  p.q_heads = int(query.size(1));
  p.kv_heads = int(key.size(1));
  p.group = p.q_heads / p.kv_heads;
  p.ordering_heads = int(call.ordering_heads);
  p.unit_heads = int(call.units.unit_heads);
  p.units = int(call.units.units);
  p.block_m = int(call.block_m);
  p.num_q_tiles = int(call.num_q_tiles);
  p.layout = call.layout;
  p.order_per_kv_head = call.order_per_kv_head;
  p.scale_log2 = float(call.scale * M_LOG2E);
  p.threshold = call.threshold;
  p.tail_threshold = call.tail_threshold;
  p.unit_threshold = call.unit_threshold;
  p.patience = int(call.patience);
  p.query = query.data_ptr();
  p.key = key.data_ptr();
  p.value = value.data_ptr();
  p.indices = call.indices.const_data_ptr<int32_t>();
  p.q_strides = strides_of(query);
  p.k_strides = strides_of(key);
  p.v_strides = strides_of(value);
  p.out = call.out.data_ptr();
  p.lse = call.lse.mutable_data_ptr<float>();
  p.tile_counts = call.tile_counts.mutable_data_ptr<int32_t>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t head_dim = query.size(3);

  const bool wgmma = use_wgmma_kernel(query.device().index());
  S2O_DISPATCH_CUDA_ELEMENT(query.scalar_type(), "sparse_attention", [&] {
    S2O_DISPATCH_HEAD_DIM(head_dim, "sparse_attention", [&] {
      const bool small_units = unit_rows <= 64;
      if (wgmma && small_units) {
        launch_sparse_attention_sm90<Element, kHeadDim, 64>(p, stream);
      } else if (wgmma) {
        launch_sparse_attention_sm90<Element, kHeadDim, 128>(p, stream);
      } else if (small_units) {
        launch_sparse_attention<Element, kHeadDim, 64>(p, stream);
      } else {
        launch_sparse_attention<Element, kHeadDim, 128>(p, stream);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(s2o, CUDA, m) { m.impl("sparse_attention", &sparse_attention_op<sparse_attention_cuda, Kernels::kCuda>); }

}  // namespace s2o
