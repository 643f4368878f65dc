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

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_cuda(
    const at::Tensor& query_in, const at::Tensor& key_in, const at::Tensor& value_in,
    const at::Tensor& indices, int64_t segment_size, int64_t q_offset, bool is_causal,
    bool order_per_kv_head, bool group_units, int64_t block_m, int64_t block_n, double threshold,
    int64_t patience, std::optional<double> tail_threshold, std::optional<double> scale,
    const std::optional<at::Tensor>& unit_threshold) {
  const SparseAttentionArgs args = check_sparse_attention_args(
      query_in, key_in, value_in, indices, segment_size, q_offset, is_causal, order_per_kv_head,
      group_units, block_m, block_n, threshold, patience, tail_threshold, /*allow_fp32=*/false);
  check_cuda_tensor(query_in, "query");
  check_cuda_head_dim(query_in.size(3));
  S2O_CHECK(block_n == kCudaBlockN, "the CUDA kernel takes block_n=", kCudaBlockN, ", got ",
            block_n);
  const int64_t unit_heads = args.units.unit_heads;
  S2O_CHECK(unit_heads * block_m <= kCudaMaxUnitRows, "the CUDA kernel takes work units of at most ",
            kCudaMaxUnitRows, " rows: block_m (", block_m, ") x query heads per unit (", unit_heads,
            ") = ", unit_heads * block_m);
  const SegmentLayout& layout = args.layout;
  const int64_t group = query_in.size(1) / key_in.size(1);
  const int64_t head_dim = query_in.size(3);

  const c10::cuda::CUDAGuard guard(query_in.device());
  const at::Tensor query = with_aligned_rows(query_in), key = with_aligned_rows(key_in),
                   value = with_aligned_rows(value_in), indices_c = indices.contiguous();
  at::Tensor unit_threshold_c;
  if (unit_threshold.has_value()) {
    check_unit_threshold(*unit_threshold, query_in, args.units.units);
    unit_threshold_c = unit_threshold->contiguous();
  }
  SparseAttentionParams p{};
  p.batch = int(query.size(0));
  p.q_heads = int(query.size(1));
  p.kv_heads = int(key.size(1));
  p.group = int(group);
  p.ordering_heads = int(args.ordering_heads);
  p.unit_heads = int(unit_heads);
  p.units = int(args.units.units);
  p.block_m = int(block_m);
  p.num_q_tiles = int(ceil_div(layout.num_queries, block_m));
  p.layout = layout;
  p.order_per_kv_head = order_per_kv_head;
  p.scale_log2 = float(resolve_scale(scale, head_dim) * M_LOG2E);
  p.threshold = float(threshold);
  p.tail_threshold = tail_threshold_or_inf(tail_threshold);
  p.unit_threshold =
      unit_threshold_c.defined() ? unit_threshold_c.const_data_ptr<float>() : nullptr;
  p.patience = int(patience);
  p.query = query.data_ptr();
  p.key = key.data_ptr();
  p.value = value.data_ptr();
  p.indices = indices_c.const_data_ptr<int32_t>();
  p.q_strides = strides_of(query);
  p.k_strides = strides_of(key);
  p.v_strides = strides_of(value);

  at::Tensor out = at::empty(query.sizes(), query.options());
  at::Tensor lse = at::empty({p.batch, p.q_heads, layout.num_queries}, query.options().dtype(at::kFloat));
  at::Tensor tile_counts =
      at::empty({p.batch, p.units, p.num_q_tiles}, query.options().dtype(at::kInt));
  p.out = out.data_ptr();
  p.lse = lse.mutable_data_ptr<float>();
  p.tile_counts = tile_counts.mutable_data_ptr<int32_t>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const bool wgmma = use_wgmma_kernel(query.device().index());
  S2O_DISPATCH_CUDA_ELEMENT(query.scalar_type(), "sparse_attention", [&] {
    S2O_DISPATCH_HEAD_DIM(head_dim, "sparse_attention", [&] {
      const bool small_units = unit_heads * block_m <= 64;
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
  return {out, lse, tile_counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(s2o, CUDA, m) { m.impl("sparse_attention", &sparse_attention_cuda); }

}  // namespace s2o
