// The three ops' C++ signatures (the schemas of registration.cpp), written once for both devices.
// Each checks its arguments, allocates its outputs and hands both to a device's kernel as one call
// struct, so that the CPU and CUDA kernels see the same checked arguments:
//   m.impl("sparse_attention", &sparse_attention_op<sparse_attention_cpu, Kernels::kCpu>);
// A device's kernel adds only the checks of its own limits.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "checks.h"
#include "s2o/layout.h"

namespace s2o {

// The kernels a call goes to: they decide the dtypes taken (checks.h: kCpuDtypes, kCudaDtypes).
enum class Kernels { kCpu, kCuda };

struct EstimateImportanceCall {
  const at::Tensor& query;  // [B, Hq, Nq, D]
  const at::Tensor& key;    // [B, Hkv, Nk, D]
  SegmentLayout layout;
  bool order_per_kv_head;
  float variance_weight;  // checks.h: variance_weight (0: no variance term)
  at::Tensor& scores;     // out: [B, H_ord, T] fp32
};

template <void (*kRun)(const EstimateImportanceCall&), Kernels kKernels>
at::Tensor estimate_importance_op(const at::Tensor& query, const at::Tensor& key,
                                  int64_t segment_size, int64_t q_offset, bool is_causal,
                                  bool order_per_kv_head, double score_variance,
                                  std::optional<double> scale) {
  check_query_key(query, key, /*allow_fp32=*/kKernels == Kernels::kCpu);
  const float weight = variance_weight(score_variance, scale, query.size(3));
  const SegmentLayout layout =
      check_layout(query.size(2), key.size(2), segment_size, q_offset, is_causal);
  const int64_t ordering_heads = order_per_kv_head ? key.size(1) : query.size(1);
  at::Tensor scores = at::empty({query.size(0), ordering_heads, layout.total_history()},
                                query.options().dtype(at::kFloat));
  kRun({query, key, layout, order_per_kv_head, weight, scores});
  return scores;
}

struct PermuteIndicesCall {
  const at::Tensor& scores;  // [B, H_ord, T] fp32, contiguous
  SegmentLayout layout;
  int64_t rank_bits, ranked_keys;
  at::Tensor& indices;  // out: [B, H_ord, T] int32
};

template <void (*kRun)(const PermuteIndicesCall&)>
at::Tensor permute_indices_op(const at::Tensor& scores, int64_t num_queries, int64_t num_keys,
                              int64_t segment_size, int64_t q_offset, bool is_causal,
                              int64_t rank_bits, int64_t ranked_keys) {
  const SegmentLayout layout = check_permute_args(scores, num_queries, num_keys, segment_size,
                                                  q_offset, is_causal, rank_bits, ranked_keys);
  const at::Tensor scores_c = scores.contiguous();
  at::Tensor indices = at::empty(scores.sizes(), scores.options().dtype(at::kInt));
  kRun({scores_c, layout, rank_bits, ranked_keys, indices});
  return indices;
}

struct SparseAttentionCall {
  const at::Tensor& query;    // [B, Hq, Nq, D]
  const at::Tensor& key;      // [B, Hkv, Nk, D]
  const at::Tensor& value;    // [B, Hkv, Nk, D]
  const at::Tensor& indices;  // [B, H_ord, T] int32, contiguous
  const float* unit_threshold;  // [B, H_unit] contiguous on query's device, or null
  SegmentLayout layout;
  UnitLayout units;
  int64_t ordering_heads;  // H_ord: ranked lists per batch entry
  bool order_per_kv_head;
  int64_t block_m, block_n, num_q_tiles, patience;
  float threshold;
  float tail_threshold;  // +inf when off
  double scale;          // resolved (None: 1/sqrt(D))
  at::Tensor& out;          // out: [B, Hq, Nq, D] in query's dtype
  at::Tensor& lse;          // out: [B, Hq, Nq] fp32
  at::Tensor& tile_counts;  // out: [B, H_unit, num_q_tiles] int32
};

template <void (*kRun)(const SparseAttentionCall&), Kernels kKernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_op(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& indices, int64_t segment_size, int64_t q_offset, bool is_causal,
    bool order_per_kv_head, bool group_units, int64_t block_m, int64_t block_n, double threshold,
    int64_t patience, std::optional<double> tail_threshold, std::optional<double> scale,
    const std::optional<at::Tensor>& unit_threshold) {
  check_query_key(query, key, /*allow_fp32=*/kKernels == Kernels::kCpu);
  check_value(value, query, key);
  check_attention_knobs(segment_size, block_m, block_n, threshold, patience, tail_threshold);
  const SegmentLayout layout =
      check_layout(query.size(2), key.size(2), segment_size, q_offset, is_causal);
  const UnitLayout units = check_units(query.size(1), key.size(1), order_per_kv_head, group_units);
  const int64_t ordering_heads = order_per_kv_head ? key.size(1) : query.size(1);
  check_indices(indices, query, ordering_heads, layout);
  at::Tensor unit_threshold_c;
  if (unit_threshold.has_value()) {
    check_unit_threshold(*unit_threshold, query, units.units);
    unit_threshold_c = unit_threshold->contiguous();
  }
  const int64_t batch = query.size(0), num_q_tiles = ceil_div(layout.num_queries, block_m);
  at::Tensor out = at::empty(query.sizes(), query.options());
  at::Tensor lse =
      at::empty({batch, query.size(1), layout.num_queries}, query.options().dtype(at::kFloat));
  at::Tensor tile_counts =
      at::empty({batch, units.units, num_q_tiles}, query.options().dtype(at::kInt));
  const at::Tensor indices_c = indices.contiguous();
  kRun({query, key, value, indices_c,
        unit_threshold_c.defined() ? unit_threshold_c.const_data_ptr<float>() : nullptr, layout,
        units, ordering_heads, order_per_kv_head, block_m, block_n, num_q_tiles, patience,
        static_cast<float>(threshold), tail_threshold_or_inf(tail_threshold),
        resolve_scale(scale, query.size(3)), out, lse, tile_counts});
  return {out, lse, tile_counts};
}

}  // namespace s2o
