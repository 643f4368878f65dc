// Kernels of s2o::estimate_importance. Torch-free.
//
// They reproduce the CPU kernel's arithmetic exactly (csrc/cpu/estimate_importance_cpu.cpp), so
// both devices rank the history identically:
//   representative r[d] = (sum of q[d] over the segment's rows, heads outer and rows inner, one
//                          fp32 addition at a time) / count
//   score(j)            = fma chain over d = 0..D-1: acc = fma(r[d], k[j][d], acc), acc0 = 0
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "s2o/common.cuh"
#include "s2o/layout.h"
#include "s2o/params.h"

namespace s2o {

// One block per (segment, ordering head, batch); thread d owns dimension d.
template <typename Element>
__global__ void segment_means_kernel(const __grid_constant__ EstimateImportanceParams p) {
  const int d = threadIdx.x;
  const int64_t s = blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z;
  const int first_head = p.order_per_kv_head ? h * p.group : h;
  const int heads = p.order_per_kv_head ? p.group : 1;
  const int64_t row_begin = s * p.layout.segment_size;
  const int64_t row_end = min(row_begin + p.layout.segment_size, p.layout.num_queries);
  const Element* q = static_cast<const Element*>(p.query) + b * p.q_strides.batch + d;
  float acc = 0.0f;
  for (int g = 0; g < heads; ++g) {
    const Element* rows = q + (first_head + g) * p.q_strides.head;
#pragma unroll 8
    for (int64_t i = row_begin; i < row_end; ++i) acc = __fadd_rn(acc, to_float(rows[i * p.q_strides.row]));
  }
  const float count = float(heads * (row_end - row_begin));
  p.representatives[((int64_t(b) * p.ordering_heads + h) * p.layout.num_segments() + s) * p.head_dim + d] =
      __fdiv_rn(acc, count);
}

struct HistoryScoresTile {
  static constexpr int kSegments = 64;  // segments per block
  static constexpr int kKeys = 64;      // keys per block
  static constexpr int kThreads = 256;  // each thread: 4 segments x 4 keys
  static constexpr int kPad = 4;        // keeps float4 alignment, spreads transposed stores
  static constexpr int kStride = kSegments + kPad;
  static int smem_bytes(int head_dim) { return 2 * head_dim * kStride * int(sizeof(float)); }
};

// Scores of a 64-key tile against 64 segments' representatives. Blocks whose keys lie beyond all
// their segments' histories exit at once (the history is a triangle).
template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(HistoryScoresTile::kThreads)
    history_scores_kernel(const __grid_constant__ EstimateImportanceParams p) {
  using Tile = HistoryScoresTile;
  const SegmentLayout& layout = p.layout;
  const int64_t num_segments = layout.num_segments();
  const int64_t key_begin = int64_t(blockIdx.x) * Tile::kKeys;
  const int64_t seg_begin = int64_t(blockIdx.y) * Tile::kSegments;
  const int64_t seg_last = min(seg_begin + Tile::kSegments, num_segments) - 1;
  if (key_begin >= layout.history_length(seg_last)) return;  // history grows with the segment
  const int bh = blockIdx.z, b = bh / p.ordering_heads, h = bh % p.ordering_heads;
  const int kv_head = p.order_per_kv_head ? h : h / p.group;

  extern __shared__ __align__(16) float smem_scores[];
  float* s_rep = smem_scores;                       // [kHeadDim][kStride]: representatives
  float* s_key = smem_scores + kHeadDim * Tile::kStride;  // [kHeadDim][kStride]: keys
  const int tid = threadIdx.x;
  const float* reps = p.representatives + (int64_t(bh) * num_segments + seg_begin) * kHeadDim;
  const Element* keys = static_cast<const Element*>(p.key) + b * p.k_strides.batch +
                        kv_head * p.k_strides.head;
  for (int e = tid; e < Tile::kSegments * kHeadDim; e += Tile::kThreads) {
    const int s = e / kHeadDim, d = e % kHeadDim;
    s_rep[d * Tile::kStride + s] = seg_begin + s < num_segments ? reps[e] : 0.0f;
  }
  for (int e = tid; e < Tile::kKeys * kHeadDim; e += Tile::kThreads) {
    const int j = e / kHeadDim, d = e % kHeadDim;
    const int64_t key = key_begin + j;
    s_key[d * Tile::kStride + j] =
        key < layout.num_keys ? to_float(keys[key * p.k_strides.row + d]) : 0.0f;
  }
  __syncthreads();

  const int key0 = (tid % 16) * 4, seg0 = (tid / 16) * 4;
  float acc[4][4] = {};
#pragma unroll 4
  for (int d = 0; d < kHeadDim; ++d) {
    const float4 r = *reinterpret_cast<const float4*>(s_rep + d * Tile::kStride + seg0);
    const float4 kv = *reinterpret_cast<const float4*>(s_key + d * Tile::kStride + key0);
    const float rs[4] = {r.x, r.y, r.z, r.w}, ks[4] = {kv.x, kv.y, kv.z, kv.w};
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = __fmaf_rn(rs[i], ks[j], acc[i][j]);
  }

  float* out = p.scores + int64_t(bh) * layout.total_history();
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t s = seg_begin + seg0 + i;
    if (s >= num_segments) break;
    const int64_t history = layout.history_length(s), offset = layout.history_offset(s);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t key = key_begin + key0 + j;
      if (key < history) out[offset + key] = acc[i][j];
    }
  }
}

}  // namespace s2o
