// Plain parameter structs of the s2o CUDA kernels: raw pointers and element strides, no torch.
// Every [B, H, N, D] tensor has a contiguous last dimension; strides are in elements.
#pragma once

#include <cstdint>

#include "s2o/layout.h"
#include "s2o/limits.h"

namespace s2o {

struct TensorStrides {  // of a [B, H, N, D] tensor
  int64_t batch, head, row;
};

struct EstimateImportanceParams {
  const void* query;        // [B, Hq, Nq, D]
  const void* key;          // [B, Hkv, Nk, D]
  // Scratch between the kernels (s2o/quantized_scores.h), contiguous:
  float* key_bounds;        // [B, Hkv, D]: m[d], zeroed before key_bounds_kernel
  int8_t* mean_high;        // [B, H_ord, num_segments, D]: r~ = 64 high + low
  int8_t* mean_low;         // [B, H_ord, num_segments, D]
  int8_t* variance_high;    // [B, H_ord, num_segments, D]: c~ = 64 high + low; null when
  int8_t* variance_low;     // variance_weight is 0
  float* mean_steps;        // [B, H_ord, num_segments]
  float* variance_steps;    // [B, H_ord, num_segments]; null when variance_weight is 0
  float* scores;            // [B, H_ord, T], contiguous
  float variance_weight;    // weight of the second-order term (0: none)
  TensorStrides q_strides, k_strides;
  SegmentLayout layout;
  int batch, q_heads, kv_heads, head_dim;
  int group;                // Hq / Hkv
  int ordering_heads;       // H_ord
  bool order_per_kv_head;
};

struct SparseAttentionParams {
  const void* query;        // [B, Hq, Nq, D]
  const void* key;          // [B, Hkv, Nk, D]
  const void* value;        // [B, Hkv, Nk, D]
  const int32_t* indices;   // [B, H_ord, T], contiguous: per segment its history keys, ranked
  void* out;                // [B, Hq, Nq, D], contiguous
  float* lse;               // [B, Hq, Nq], contiguous
  int32_t* tile_counts;     // [B, units, num_q_tiles], contiguous
  TensorStrides q_strides, k_strides, v_strides;
  SegmentLayout layout;
  int batch, q_heads, kv_heads;
  int group;                // Hq / Hkv
  int ordering_heads;       // H_ord: ranked lists per batch entry
  int unit_heads;           // query heads per work unit: G with group_units, else 1
  int units;                // work units per batch entry and query tile: Hq / unit_heads
  int block_m;              // query rows per head in a work unit
  int num_q_tiles;          // ceil(Nq / block_m)
  float scale_log2;         // softmax scale * log2(e): scores are kept in the log2 domain
  float threshold;
  float tail_threshold;     // +inf when off (s2o/stop_rule.h)
  const float* unit_threshold;  // [B, units] or null: per unit head, replaces threshold; < 0
                                // skips the unit (tile count 0, out and lse not written)
  int patience;
  bool order_per_kv_head;
};

}  // namespace s2o
