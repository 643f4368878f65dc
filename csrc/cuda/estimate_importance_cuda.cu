// CUDA host wrapper of s2o::estimate_importance (csrc/include/s2o/importance.cuh).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda_dispatch.h"
#include "cuda_utils.h"
#include "ops.h"
#include "s2o/importance.cuh"

namespace s2o {
namespace {

void estimate_importance_cuda(const EstimateImportanceCall& call) {
  check_cuda_tensor(call.query, "query");
  check_cuda_head_dim(call.query.size(3));
  const SegmentLayout& layout = call.layout;
  const c10::cuda::CUDAGuard guard(call.query.device());
  const at::Tensor query = with_aligned_rows(call.query), key = with_aligned_rows(call.key);

  EstimateImportanceParams p{};
  p.batch = int(query.size(0));
  p.q_heads = int(query.size(1));
  p.kv_heads = int(key.size(1));
  p.head_dim = int(query.size(3));
  p.group = p.q_heads / p.kv_heads;
  p.order_per_kv_head = call.order_per_kv_head;
  p.ordering_heads = int(call.scores.size(1));
  p.layout = layout;
  p.query = query.data_ptr();
  p.key = key.data_ptr();
  p.q_strides = strides_of(query);
  p.k_strides = strides_of(key);

  p.variance_weight = call.variance_weight;
  p.scores = call.scores.mutable_data_ptr<float>();
  if (layout.total_history() == 0) return;
  // The keys some segment sees: the last segment's history is the longest.
  const int64_t seen_keys = layout.history_length(layout.num_segments() - 1);

  // Scratch between the kernels: the keys' bounds, the segments' quantised vectors and steps.
  const int64_t segments = int64_t(p.batch) * p.ordering_heads * layout.num_segments();
  const at::TensorOptions bytes = query.options().dtype(at::kChar);
  const at::TensorOptions floats = query.options().dtype(at::kFloat);
  const at::Tensor bounds = at::zeros({p.batch, p.kv_heads, p.head_dim}, floats);
  const bool with_variance = p.variance_weight > 0.0f;
  const at::Tensor vectors = at::empty({with_variance ? 4 : 2, segments, p.head_dim}, bytes);
  const at::Tensor steps = at::empty({with_variance ? 2 : 1, segments}, floats);
  p.key_bounds = bounds.mutable_data_ptr<float>();
  p.mean_high = static_cast<int8_t*>(vectors[0].data_ptr());
  p.mean_low = static_cast<int8_t*>(vectors[1].data_ptr());
  p.mean_steps = steps[0].mutable_data_ptr<float>();
  if (with_variance) {
    p.variance_high = static_cast<int8_t*>(vectors[2].data_ptr());
    p.variance_low = static_cast<int8_t*>(vectors[3].data_ptr());
    p.variance_steps = steps[1].mutable_data_ptr<float>();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  S2O_DISPATCH_CUDA_ELEMENT(query.scalar_type(), "estimate_importance", [&] {
    S2O_DISPATCH_HEAD_DIM(p.head_dim, "estimate_importance", [&] {
      const dim3 bound_grid(unsigned(ceil_div(layout.num_keys, kBoundKeys)), unsigned(p.kv_heads),
                            unsigned(p.batch));
      key_bounds_kernel<Element><<<bound_grid, kHeadDim, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const dim3 vector_grid(unsigned(layout.num_segments()), unsigned(p.ordering_heads),
                             unsigned(p.batch));
      segment_vectors_kernel<Element, kHeadDim><<<vector_grid, kHeadDim, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      using Tile = HistoryScoresTile<kHeadDim>;
      const auto kernel = history_scores_kernel<Element, kHeadDim>;
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          Tile::kSharedBytes));
      const dim3 grid(unsigned(ceil_div(seen_keys, Tile::kKeys)),
                      unsigned(ceil_div(layout.num_segments(), Tile::kSegments)),
                      unsigned(p.batch * p.ordering_heads));
      kernel<<<grid, Tile::kThreads, Tile::kSharedBytes, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(s2o, CUDA, m) { m.impl("estimate_importance",
         &estimate_importance_op<estimate_importance_cuda, Kernels::kCuda>); }

}  // namespace s2o
