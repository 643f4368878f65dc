// CUDA host wrapper of s2o::estimate_importance (csrc/include/s2o/importance.cuh).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda_dispatch.h"
#include "cuda_utils.h"
#include "s2o/importance.cuh"

namespace s2o {
namespace {

at::Tensor estimate_importance_cuda(const at::Tensor& query_in, const at::Tensor& key_in,
                                    int64_t segment_size, int64_t q_offset, bool is_causal,
                                    bool order_per_kv_head, double score_variance,
                                    std::optional<double> scale) {
  check_query_key(query_in, key_in, /*allow_fp32=*/false);
  const float weight = variance_weight(score_variance, scale, query_in.size(3));
  check_cuda_tensor(query_in, "query");
  check_cuda_head_dim(query_in.size(3));
  const SegmentLayout layout =
      check_layout(query_in.size(2), key_in.size(2), segment_size, q_offset, is_causal);
  const c10::cuda::CUDAGuard guard(query_in.device());
  const at::Tensor query = with_aligned_rows(query_in), key = with_aligned_rows(key_in);

  EstimateImportanceParams p{};
  p.batch = int(query.size(0));
  p.q_heads = int(query.size(1));
  p.kv_heads = int(key.size(1));
  p.head_dim = int(query.size(3));
  p.group = p.q_heads / p.kv_heads;
  p.order_per_kv_head = order_per_kv_head;
  p.ordering_heads = order_per_kv_head ? p.kv_heads : p.q_heads;
  p.layout = layout;
  p.query = query.data_ptr();
  p.key = key.data_ptr();
  p.q_strides = strides_of(query);
  p.k_strides = strides_of(key);

  auto options = query.options().dtype(at::kFloat);
  // The segments' representatives: scratch between the two kernels.
  at::Tensor representatives =
      at::empty({p.batch, p.ordering_heads, layout.num_segments(), p.head_dim}, options);
  at::Tensor scores = at::empty({p.batch, p.ordering_heads, layout.total_history()}, options);
  p.representatives = representatives.mutable_data_ptr<float>();
  p.scores = scores.mutable_data_ptr<float>();
  p.variance_weight = weight;
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
  return scores;
}

}  // namespace

TORCH_LIBRARY_IMPL(s2o, CUDA, m) { m.impl("estimate_importance", &estimate_importance_cuda); }

}  // namespace s2o
