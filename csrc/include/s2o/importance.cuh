// Kernels of s2o::estimate_importance. Torch-free.
//
// They reproduce the CPU kernel's arithmetic exactly (csrc/cpu/estimate_importance_cpu.cpp), so
// both devices rank the history identically:
//   representative r[d] = (sum of q[d] over the segment's rows, heads outer and rows inner, one
//                          fp32 addition at a time) / count
//   score(j)            = fma chain over d = 0..D-1: acc = fma(r[d], k[j][d], acc), acc0 = 0
// and with variance_weight w > 0:
//   c[d]                = w * ((fma chain over the rows, same order, of e * e with
//                          e = q[d] - r[d]) / count)
//   score(j)           += fma chain over d: acc = fma(c[d], k[j][d] * k[j][d], acc)
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
  const float mean = __fdiv_rn(acc, count);
  const int64_t out = ((int64_t(b) * p.ordering_heads + h) * p.layout.num_segments() + s) * p.head_dim + d;
  p.representatives[out] = mean;
  if (p.variance_weight > 0.0f) {
    float spread = 0.0f;
    for (int g = 0; g < heads; ++g) {
      const Element* rows = q + (first_head + g) * p.q_strides.head;
#pragma unroll 8
      for (int64_t i = row_begin; i < row_end; ++i) {
        const float e = __fsub_rn(to_float(rows[i * p.q_strides.row]), mean);
        spread = __fmaf_rn(e, e, spread);
      }
    }
    p.variances[out] = __fmul_rn(p.variance_weight, __fdiv_rn(spread, count));
  }
}

struct HistoryScoresTile {
  static constexpr int kSegments = 64;   // segments per block (small: the history is a triangle)
  static constexpr int kKeys = 256;      // keys per block
  static constexpr int kDimStep = 16;    // head dims staged in shared memory at a time
  static constexpr int kThreads = 256;   // 8 x 32 threads, each 8 segments x 8 keys
  static constexpr int kPad = 4;         // keeps float4 alignment of the transposed rows
  static constexpr int kSegStride = kSegments + kPad;
  static constexpr int kKeyStride = kKeys + kPad;
  static_assert(kKeys == kThreads, "each thread stages the dims of one key");
  static_assert(kSegments * kDimStep == kThreads * 4, "one float4 representative load per thread");
};

// First segment and first key (within the block's tile) of thread tid's 8 x 8 scores. Warps are
// 2 (segments) x 4 (keys); in a warp, lane bits 0 and 2 pick one of 4 groups of 8 segments and
// bits 1, 3, 4 one of 8 groups of 4 keys. So lanes n and n^2 load the same representatives and
// lanes n and n^1 the same keys: the shared memory returns each 16-byte load to such pairs at
// once, two requests per load instead of four, and the shared loads (4 per 64 fmas) no longer
// hold the fmas back.
__device__ __forceinline__ int2 lane_tile(int tid) {
  const int warp = tid / 32, lane = tid % 32;
  const int seg_group = (lane & 1) | ((lane >> 1) & 2);
  const int key_group = ((lane >> 1) & 1) | ((lane >> 2) & 6);
  return make_int2((warp / 4) * 32 + seg_group * 8, (warp % 4) * 64 + key_group * 4);
}

// Scores of a 256-key tile against 64 segments' representatives, as a register-tiled SGEMM: each
// thread owns 8 consecutive segments x 8 keys (two groups of 4 consecutive keys 32 apart) and
// accumulates over d in order, one fma per d: four 16-byte shared loads feed 64 fmas. A warp
// covers 32 segments x 64 keys (lane_tile). With a variance term a second pass over
// d continues the same accumulators with the weighted variances against the squared keys. Blocks
// whose keys lie beyond all their segments' histories exit (the history is a triangle).
template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(HistoryScoresTile::kThreads, 2)
    history_scores_kernel(const __grid_constant__ EstimateImportanceParams p) {
  using Tile = HistoryScoresTile;
  constexpr int kStep = Tile::kDimStep;
  static_assert(kHeadDim % kStep == 0, "whole dimension steps");
  const SegmentLayout& layout = p.layout;
  const int64_t num_segments = layout.num_segments();
  const int64_t seg_begin = int64_t(blockIdx.y) * Tile::kSegments;
  const int64_t seg_last = min(seg_begin + Tile::kSegments, num_segments) - 1;
  const int64_t key_begin = int64_t(blockIdx.x) * Tile::kKeys;
  if (key_begin >= layout.history_length(seg_last)) return;  // history grows with the segment
  const int bh = blockIdx.z, b = bh / p.ordering_heads, h = bh % p.ordering_heads;
  const int kv_head = p.order_per_kv_head ? h : h / p.group;

  __shared__ __align__(16) float s_rep[kStep * Tile::kSegStride];  // [d][segment]
  __shared__ __align__(16) float s_key[kStep * Tile::kKeyStride];  // [d][key]
  const int tid = threadIdx.x;
  const Element* keys = static_cast<const Element*>(p.key) + b * p.k_strides.batch +
                        kv_head * p.k_strides.head;
  // Staging: thread t takes key t's kStep dims (two 16-byte loads) and a float4 of one
  // representative; consecutive threads take consecutive keys (segments), so the transposed
  // stores hit distinct banks.
  const int rep_row = tid % Tile::kSegments, rep_part = tid / Tile::kSegments;  // part: 0..3
  const int64_t stage_key = key_begin + tid;
  const bool key_valid = stage_key < layout.num_keys;
  const bool rep_valid = seg_begin + rep_row < num_segments;
  const Element* key_src = keys + (key_valid ? stage_key : 0) * p.k_strides.row;
  const int64_t rep_offset = (int64_t(bh) * num_segments + seg_begin + rep_row) * kHeadDim + rep_part * 4;

  // Steps of kStep dims: [0, kSteps) score the representatives against the keys, [kSteps,
  // 2 kSteps) (with a variance term) the weighted variances against the squared keys. The next
  // step's keys and vectors are loaded into registers while this step computes.
  constexpr int kSteps = kHeadDim / kStep;
  const int steps = p.variance_weight > 0.0f ? 2 * kSteps : kSteps;
  uint4 key_raw[2];
  float4 rep_raw;
  auto load_step = [&](int step) {
    const int d0 = (step % kSteps) * kStep;
    const float* vectors = step < kSteps ? p.representatives : p.variances;
#pragma unroll
    for (int i = 0; i < 2; ++i)
      key_raw[i] = key_valid ? *reinterpret_cast<const uint4*>(key_src + d0 + i * 8)
                             : make_uint4(0, 0, 0, 0);
    rep_raw = rep_valid ? *reinterpret_cast<const float4*>(vectors + rep_offset + d0)
                        : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  };
  load_step(0);

  const int2 tile = lane_tile(tid);
  const int seg0 = tile.x, key0 = tile.y;
  float acc[8][8] = {};
#pragma unroll 1
  for (int step = 0; step < steps; ++step) {
    __syncthreads();  // the previous step's tiles are no longer read
    const Element* e = reinterpret_cast<const Element*>(key_raw);
    if (step < kSteps) {
#pragma unroll
      for (int i = 0; i < kStep; ++i) s_key[i * Tile::kKeyStride + tid] = to_float(e[i]);
    } else {
#pragma unroll
      for (int i = 0; i < kStep; ++i) {
        const float k = to_float(e[i]);
        s_key[i * Tile::kKeyStride + tid] = __fmul_rn(k, k);  // rounded before the fma, as on the CPU
      }
    }
    s_rep[(rep_part * 4 + 0) * Tile::kSegStride + rep_row] = rep_raw.x;
    s_rep[(rep_part * 4 + 1) * Tile::kSegStride + rep_row] = rep_raw.y;
    s_rep[(rep_part * 4 + 2) * Tile::kSegStride + rep_row] = rep_raw.z;
    s_rep[(rep_part * 4 + 3) * Tile::kSegStride + rep_row] = rep_raw.w;
    __syncthreads();
    if (step + 1 < steps) load_step(step + 1);
#pragma unroll
    for (int d = 0; d < kStep; ++d) {
      const float* rd = s_rep + d * Tile::kSegStride + seg0;
      const float4 r_lo = *reinterpret_cast<const float4*>(rd);
      const float4 r_hi = *reinterpret_cast<const float4*>(rd + 4);
      const float* kd = s_key + d * Tile::kKeyStride + key0;
      const float4 k_lo = *reinterpret_cast<const float4*>(kd);
      const float4 k_hi = *reinterpret_cast<const float4*>(kd + 32);
      const float rs[8] = {r_lo.x, r_lo.y, r_lo.z, r_lo.w, r_hi.x, r_hi.y, r_hi.z, r_hi.w};
      const float ks[8] = {k_lo.x, k_lo.y, k_lo.z, k_lo.w, k_hi.x, k_hi.y, k_hi.z, k_hi.w};
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = __fmaf_rn(rs[i], ks[j], acc[i][j]);
    }
  }

  // Each group of 4 consecutive keys goes out as one 16-byte store where the segment's scores
  // are aligned and all 4 lie in its history, else key by key.
  float* out = p.scores + int64_t(bh) * layout.total_history();
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int64_t s = seg_begin + seg0 + i;
    if (s >= num_segments) continue;
    const int64_t history = layout.history_length(s);
    float* seg_out = out + layout.history_offset(s);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t key = key_begin + key0 + half * 32;
      const float* v = acc[i] + half * 4;
      if (key + 4 <= history && (reinterpret_cast<uintptr_t>(seg_out + key) & 15) == 0) {
        *reinterpret_cast<float4*>(seg_out + key) = make_float4(v[0], v[1], v[2], v[3]);
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (key + j < history) seg_out[key + j] = v[j];
      }
    }
  }
}

}  // namespace s2o
