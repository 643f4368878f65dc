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

  // The segments' representatives: scratch between the two kernels.
  at::Tensor representatives = at::empty({p.batch, p.ordering_heads, layout.num_segments(), p.head_dim},
                                         query.options().dtype(at::kFloat));
  p.representatives = representatives.mutable_data_ptr<float>();
  p.scores = call.scores.mutable_data_ptr<float>();
  p.variance_weight = call.variance_weight;
  at::Tensor variances;  // the weighted variances, scratch of the second scoring pass
  if (p.variance_weight > 0.0f) {
    variances = at::empty_like(representatives);
    p.variances = variances.mutable_data_ptr<float>();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  S2O_DISPATCH_CUDA_ELEMENT(query.scalar_type(), "estimate_importance", [&] {
    S2O_DISPATCH_HEAD_DIM(p.head_dim, "estimate_importance", [&] {
      const dim3 mean_grid(unsigned(layout.num_segments()), unsigned(p.ordering_heads),
                           unsigned(p.batch));
      segment_means_kernel<Element><<<mean_grid, kHeadDim, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (layout.total_history() == 0) return;
      using Tile = HistoryScoresTile;
      const dim3 grid(unsigned(ceil_div(layout.num_keys, Tile::kKeys)),
                      unsigned(ceil_div(layout.num_segments(), Tile::kSegments)),
                      unsigned(p.batch * p.ordering_heads));
      history_scores_kernel<Element, kHeadDim><<<grid, Tile::kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(s2o, CUDA, m) { m.impl("estimate_importance",
         &estimate_importance_op<estimate_importance_cuda, Kernels::kCuda>); }

}  // namespace s2o
