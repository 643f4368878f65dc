// Argument checks shared by the CPU and CUDA host wrappers. Every message names the argument.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

#include "message.h"
#include "s2o/layout.h"
#include "s2o/limits.h"

namespace s2o {

// The dtypes the kernels take: the CPU kernels all three, the CUDA kernels the 16-bit ones (s2o._C
// exports both lists to Python).
constexpr at::ScalarType kCpuDtypes[] = {at::kFloat, at::kBFloat16, at::kHalf};
constexpr at::ScalarType kCudaDtypes[] = {at::kBFloat16, at::kHalf};

template <size_t N>
inline bool contains(const at::ScalarType (&dtypes)[N], at::ScalarType t) {
  for (const at::ScalarType d : dtypes) {
    if (d == t) return true;
  }
  return false;
}

// allow_fp32: the CPU kernels' dtypes, else the CUDA kernels'.
inline bool kernels_take(at::ScalarType t, bool allow_fp32) {
  return allow_fp32 ? contains(kCpuDtypes, t) : contains(kCudaDtypes, t);
}

inline void check_float_tensor(const at::Tensor& t, const char* name, bool allow_fp32) {
  S2O_CHECK(t.defined(), name, " is undefined");
  S2O_CHECK(kernels_take(t.scalar_type(), allow_fp32),
              name, " must be ", allow_fp32 ? "float32, bfloat16 or float16" : "bfloat16 or float16",
              " on ", t.device().type(), ", got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name) {
  S2O_CHECK(a.device() == b.device(), a_name, " and ", b_name,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

// query [B, Hq, Nq, D]; key [B, Hkv, Nk, D]. Checks what estimate_importance and
// sparse_attention share. `allow_fp32` is true on the CPU.
inline void check_query_key(const at::Tensor& query, const at::Tensor& key, bool allow_fp32) {
  check_float_tensor(query, "query", allow_fp32);
  check_float_tensor(key, "key", allow_fp32);
  check_same_device(query, "query", key, "key");
  S2O_CHECK(query.dim() == 4, "query must have shape [B, Hq, Nq, D], got ", query.sizes());
  S2O_CHECK(key.dim() == 4, "key must have shape [B, Hkv, Nk, D], got ", key.sizes());
  S2O_CHECK(key.scalar_type() == query.scalar_type(), "key dtype ", key.scalar_type(),
              " differs from query dtype ", query.scalar_type());
  S2O_CHECK(key.size(0) == query.size(0), "key batch size ", key.size(0),
              " differs from query batch size ", query.size(0));
  S2O_CHECK(key.size(3) == query.size(3), "key head dim ", key.size(3),
              " differs from query head dim ", query.size(3));
  S2O_CHECK(query.size(1) >= 1 && key.size(1) >= 1, "query and key need at least one head, got ",
              query.size(1), " and ", key.size(1));
  S2O_CHECK(query.size(1) % key.size(1) == 0, "query heads (", query.size(1),
              ") must be a multiple of key heads (", key.size(1), ")");
  S2O_CHECK(query.size(2) >= 1, "query needs at least one row (Nq >= 1), got ", query.size(2));
  S2O_CHECK(key.size(2) >= 1, "key needs at least one row (Nk >= 1), got ", key.size(2));
  S2O_CHECK(query.size(3) >= 1 && query.size(3) <= kCpuMaxHeadDim, "query head dim must be in [1, ",
              kCpuMaxHeadDim, "], got ", query.size(3));
}

inline void check_value(const at::Tensor& value, const at::Tensor& query, const at::Tensor& key) {
  S2O_CHECK(value.defined(), "value is undefined");
  check_same_device(query, "query", value, "value");
  S2O_CHECK(value.dim() == 4, "value must have shape [B, Hkv, Nk, D], got ", value.sizes());
  S2O_CHECK(value.scalar_type() == query.scalar_type(), "value dtype ", value.scalar_type(),
              " differs from query dtype ", query.scalar_type());
  S2O_CHECK(value.sizes() == key.sizes(), "value shape ", value.sizes(), " differs from key shape ",
              key.sizes(), " (s2o needs the same head count, length and head dim for key and value)");
}

// segment_size and q_offset against the query and key lengths. Valid q_offset: 0 (top-left
// causal, SDPA's is_causal) up to Nk - Nq (bottom-right causal, queries at the end of the keys).
inline SegmentLayout check_layout(int64_t num_queries, int64_t num_keys, int64_t segment_size,
                                  int64_t q_offset, bool is_causal) {
  S2O_CHECK(segment_size > 0, "segment_size must be positive, got ", segment_size);
  S2O_CHECK(num_keys <= INT32_MAX, "s2o indexes keys with int32, so Nk must be < 2^31, got ",
              num_keys);
  const int64_t max_offset = num_keys > num_queries ? num_keys - num_queries : 0;
  S2O_CHECK(q_offset >= 0 && q_offset <= max_offset, "q_offset must be in [0, ", max_offset,
              "] (0: top-left causal alignment, Nk - Nq: bottom-right) for Nq=", num_queries,
              " and Nk=", num_keys, ", got ", q_offset);
  return SegmentLayout{num_queries, num_keys, segment_size, q_offset, is_causal};
}

inline void check_rank_bits(int64_t rank_bits) {
  S2O_CHECK(rank_bits >= 1 && rank_bits <= 32, "rank_bits must be in [1, 32], got ", rank_bits);
}

// The arguments of permute_indices; returns the segment layout the scores are laid out in.
inline SegmentLayout check_permute_args(const at::Tensor& scores, int64_t num_queries,
                                        int64_t num_keys, int64_t segment_size, int64_t q_offset,
                                        bool is_causal, int64_t rank_bits, int64_t ranked_keys) {
  S2O_CHECK(scores.defined() && scores.scalar_type() == at::kFloat,
            "scores must be a float32 tensor (from estimate_importance)");
  S2O_CHECK(num_queries >= 1, "num_queries must be >= 1, got ", num_queries);
  S2O_CHECK(num_keys >= 1, "num_keys must be >= 1, got ", num_keys);
  check_rank_bits(rank_bits);
  S2O_CHECK(ranked_keys >= 0, "ranked_keys must be >= 0 (0: rank the whole history), got ", ranked_keys);
  const SegmentLayout layout = check_layout(num_queries, num_keys, segment_size, q_offset, is_causal);
  const int64_t total = layout.total_history();
  S2O_CHECK(scores.dim() == 3 && scores.size(2) == total,
            "scores must have shape [B, ordering heads, ", total,
            "] (the total history for these shapes and parameters), got ", scores.sizes());
  return layout;
}

inline void check_attention_knobs(int64_t segment_size, int64_t block_m, int64_t block_n,
                                  double threshold, int64_t patience,
                                  std::optional<double> tail_threshold) {
  S2O_CHECK(block_m > 0, "block_m must be positive, got ", block_m);
  S2O_CHECK(block_n > 0, "block_n must be positive, got ", block_n);
  S2O_CHECK(segment_size % block_m == 0, "segment_size (", segment_size,
              ") must be a multiple of block_m (", block_m, ") so that no query tile straddles two segments");
  S2O_CHECK(std::isfinite(threshold) && threshold >= 0, "threshold must be finite and >= 0, got ",
              threshold);
  S2O_CHECK(patience >= 1, "patience must be >= 1, got ", patience);
  S2O_CHECK(!tail_threshold || (std::isfinite(*tail_threshold) && *tail_threshold >= 0),
            "tail_threshold must be finite and >= 0 (or None), got ", tail_threshold.value_or(0));
}

// The kernels' form of tail_threshold: None -> +inf (the projection never binds).
inline float tail_threshold_or_inf(std::optional<double> tail_threshold) {
  return tail_threshold ? static_cast<float>(*tail_threshold)
                        : std::numeric_limits<float>::infinity();
}

// indices [B, H_ord, total_history] int32, from permute_indices.
inline void check_indices(const at::Tensor& indices, const at::Tensor& query, int64_t ordering_heads,
                          const SegmentLayout& layout) {
  S2O_CHECK(indices.defined(), "indices is undefined");
  check_same_device(query, "query", indices, "indices");
  S2O_CHECK(indices.scalar_type() == at::kInt, "indices must be int32, got ", indices.scalar_type());
  const int64_t total = layout.total_history();
  S2O_CHECK(indices.dim() == 3 && indices.size(0) == query.size(0) &&
                  indices.size(1) == ordering_heads && indices.size(2) == total,
              "indices must have shape [B, ordering heads, total history] = [", query.size(0), ", ",
              ordering_heads, ", ", total, "] for these shapes and parameters, got ", indices.sizes());
}

// Work units of sparse_attention: the query heads that stop together. With group_units the G
// heads of a KV group (which then must share one ranking per KV head), else each query head.
struct UnitLayout {
  int64_t unit_heads;  // query heads per unit
  int64_t units;       // units per batch entry: Hq / unit_heads
};

inline UnitLayout check_units(int64_t q_heads, int64_t kv_heads, bool order_per_kv_head,
                              bool group_units) {
  S2O_CHECK(!group_units || order_per_kv_head,
              "group_units needs order_per_kv_head (the heads of a unit share one ranking)");
  const int64_t unit_heads = group_units ? q_heads / kv_heads : 1;
  return UnitLayout{unit_heads, q_heads / unit_heads};
}

// unit_threshold [B, H_unit] fp32 on query's device (H_unit: the units per batch entry).
inline void check_unit_threshold(const at::Tensor& unit_threshold, const at::Tensor& query,
                                 int64_t units) {
  S2O_CHECK(unit_threshold.scalar_type() == at::kFloat, "unit_threshold must be float32, got ",
            unit_threshold.scalar_type());
  S2O_CHECK(unit_threshold.device() == query.device(), "unit_threshold must be on query's device (",
            query.device(), "), got ", unit_threshold.device());
  S2O_CHECK(unit_threshold.dim() == 2 && unit_threshold.size(0) == query.size(0) &&
                unit_threshold.size(1) == units,
            "unit_threshold must have shape [B, unit heads] = [", query.size(0), ", ", units,
            "], got ", unit_threshold.sizes());
}

inline double resolve_scale(std::optional<double> scale, int64_t head_dim) {
  const double s = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(head_dim));
  S2O_CHECK(std::isfinite(s), "scale must be finite, got ", s);
  return s;
}

// The weight of estimate_importance's variance term in score units: score_variance (in units of
// the softmax scale) x the scale.
inline float variance_weight(double score_variance, std::optional<double> scale,
                             int64_t head_dim) {
  S2O_CHECK(std::isfinite(score_variance) && score_variance >= 0.0,
            "score_variance must be finite and >= 0, got ", score_variance);
  if (score_variance == 0.0) return 0.0f;
  const double s = resolve_scale(scale, head_dim);
  S2O_CHECK(s > 0.0, "scale must be > 0 with score_variance > 0 (the variance term), got ", s);
  return static_cast<float>(score_variance * s);
}

}  // namespace s2o
