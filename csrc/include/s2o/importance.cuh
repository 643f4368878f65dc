// Kernels of s2o::estimate_importance. Torch-free.
//
// They compute what the CPU kernel computes (csrc/cpu/estimate_importance_cpu.cpp), bit for bit:
// the segment statistics in the same fp32 order, then the scores as integer products of quantised
// vectors (s2o/quantized_scores.h) on the int8 tensor cores, where the order of the integer sums
// does not matter:
//   representative r[d] = (sum of q[d] over the segment's rows, heads outer and rows inner, one
//                          fp32 addition at a time) / count
//   c[d]                = w * ((fma chain over the rows, same order, of e * e with
//                          e = q[d] - r[d]) / count)     (with variance_weight w > 0)
// Three launches: the keys' per-dimension bounds, the segments' quantised vectors, the scores.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "s2o/common.cuh"
#include "s2o/layout.h"
#include "s2o/params.h"
#include "s2o/quantized_scores.h"

namespace s2o {

// Keys per block of key_bounds_kernel.
constexpr int kBoundKeys = 512;

// m[d] = max |k[j][d]| over all keys (per batch entry and KV head): one block per
// kBoundKeys keys of one head, thread d owns dimension d; the blocks meet in an integer atomicMax,
// exact for non-negative floats. fmaxf drops NaNs, as std::fmax does on the CPU. key_bounds must be
// zeroed before.
template <typename Element>
__global__ void key_bounds_kernel(const __grid_constant__ EstimateImportanceParams p) {
  const int d = threadIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t begin = int64_t(blockIdx.x) * kBoundKeys;
  const int64_t end = min(begin + kBoundKeys, p.layout.num_keys);
  const Element* k =
      static_cast<const Element*>(p.key) + b * p.k_strides.batch + h * p.k_strides.head + d;
  float bound = 0.0f;
#pragma unroll 8
  for (int64_t j = begin; j < end; ++j)
    bound = fmaxf(bound, fabsf(to_float(k[j * p.k_strides.row])));
  atomicMax(reinterpret_cast<int*>(p.key_bounds) + (int64_t(b) * p.kv_heads + h) * p.head_dim + d,
            __float_as_int(bound));
}

// max over the block (one thread per dimension, up to 4 warps) of a non-negative value.
template <int kHeadDim>
__device__ __forceinline__ float block_max(float value, float* scratch) {
  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 128, "one to four whole warps");
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2)
    value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
  __syncthreads();  // an earlier call's scratch has been read
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = value;
  __syncthreads();
#pragma unroll
  for (int w = 0; w < kHeadDim / 32; ++w) value = fmaxf(value, scratch[w]);
  return value;
}

// The value's quantised form against the block's largest |value| (quantized_scores.h); returns
// it and writes the product step.
template <int kHeadDim>
__device__ __forceinline__ int32_t quantize_against_block(float value, float* scratch,
                                                          float* step) {
  // fmaxf(0, .) maps a NaN to 0, as the CPU's running std::fmax from 0 does.
  const float largest = block_max<kHeadDim>(fmaxf(0.0f, fabsf(value)), scratch);
  *step = dequantization_step(largest);
  return quantize(value, quantization_gain(largest));
}

// The 12-bit value v = 64 * high + low with low in [-32, 31] and high in [-32, 32]: both int8, so
// that r~ . k~ = 4096 high.high + 64 (high.low + low.high) + low.low on the int8 tensor cores.
__device__ __forceinline__ void split_levels(int32_t v, int8_t* high, int8_t* low) {
  static_assert(kScoreLevels <= 64 * 32 - 1, "the high part must fit [-32, 32]");
  const int32_t h = (v + 32) >> 6;  // arithmetic shift: floor((v + 32) / 64)
  *high = int8_t(h);
  *low = int8_t(v - h * 64);
}

// One block per (segment, ordering head, batch); thread d owns dimension d. Writes the segment's
// quantised vectors (r~ and c~, each split into high and low parts) and their product steps.
template <typename Element, int kHeadDim>
__global__ void segment_vectors_kernel(const __grid_constant__ EstimateImportanceParams p) {
  __shared__ float scratch[kHeadDim / 32];
  const int d = threadIdx.x;
  const int64_t s = blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z;
  const int first_head = p.order_per_kv_head ? h * p.group : h;
  const int kv_head = p.order_per_kv_head ? h : h / p.group;
  const int heads = p.order_per_kv_head ? p.group : 1;
  const int64_t row_begin = s * p.layout.segment_size;
  const int64_t row_end = min(row_begin + p.layout.segment_size, p.layout.num_queries);
  const Element* q = static_cast<const Element*>(p.query) + b * p.q_strides.batch + d;
  float acc = 0.0f;
  for (int g = 0; g < heads; ++g) {
    const Element* rows = q + (first_head + g) * p.q_strides.head;
#pragma unroll 8
    for (int64_t i = row_begin; i < row_end; ++i)
      acc = __fadd_rn(acc, to_float(rows[i * p.q_strides.row]));
  }
  const float count = float(heads * (row_end - row_begin));
  const float mean = __fdiv_rn(acc, count);
  const float bound = p.key_bounds[(int64_t(b) * p.kv_heads + kv_head) * kHeadDim + d];
  const int64_t segment = (int64_t(b) * p.ordering_heads + h) * p.layout.num_segments() + s;
  const int64_t out = segment * kHeadDim + d;
  float step;
  const int32_t level = quantize_against_block<kHeadDim>(__fmul_rn(mean, bound), scratch, &step);
  split_levels(level, p.mean_high + out, p.mean_low + out);
  if (d == 0) p.mean_steps[segment] = step;
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
    const float variance = __fmul_rn(p.variance_weight, __fdiv_rn(spread, count));
    const int32_t variance_level = quantize_against_block<kHeadDim>(
        __fmul_rn(variance, __fmul_rn(bound, bound)), scratch, &step);
    split_levels(variance_level, p.variance_high + out, p.variance_low + out);
    if (d == 0) p.variance_steps[segment] = step;
  }
}

// D += A B for one m16n8k32 int8 tile: A row-major 16x32 (4 regs), B column-major 32x8 (2 regs),
// D 16x8 int32 (4 regs).
__device__ __forceinline__ void mma_16832_s8(int32_t* d, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <int kHeadDim>
struct HistoryScoresTile {
  static constexpr int kSegments = 64;  // segments per block (small: the history is a triangle)
  static constexpr int kKeys = 128;     // keys per block
  static constexpr int kThreads = 256;  // 8 warps: 2 (segments) x 4 (keys), 32 x 32 scores each
  // Bytes per row of an int8 plane in shared memory: 16 more than a row, so that the 8 rows and
  // 4 column words of one fragment load fall in 32 distinct banks.
  static constexpr int kStride = kHeadDim + 16;
  static constexpr int kSegmentPlane = kSegments * kStride;
  static constexpr int kKeyPlane = kKeys * kStride;
  // Planes: the segments' r~ and c~, the keys' k~ and k2~, each as high and low parts; then the
  // keys' gains.
  static constexpr int kSharedBytes =
      4 * kSegmentPlane + 4 * kKeyPlane + 2 * kHeadDim * int(sizeof(float));
  static_assert(kHeadDim % 32 == 0, "whole k-steps of 32 dimensions");
};

// The 4 int8 values at (row, d..d+3) of a plane whose rows are kStride bytes apart.
template <int kStride>
__device__ __forceinline__ uint32_t plane_word(const int8_t* plane, int row, int d) {
  return *reinterpret_cast<const uint32_t*>(plane + row * kStride + d);
}

// acc[i][j] += the warp's 32 x 32 block of plane_a . plane_b over all dimensions.
template <int kHeadDim, int kStride>
__device__ __forceinline__ void accumulate_products(int32_t (*acc)[4][4], const int8_t* plane_a,
                                                    const int8_t* plane_b, int seg0, int key0) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int k0 = 0; k0 < kHeadDim; k0 += 32) {
    uint32_t a[2][4], b[4][2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = seg0 + i * 16 + g;
      a[i][0] = plane_word<kStride>(plane_a, row, k0 + t * 4);
      a[i][1] = plane_word<kStride>(plane_a, row + 8, k0 + t * 4);
      a[i][2] = plane_word<kStride>(plane_a, row, k0 + 16 + t * 4);
      a[i][3] = plane_word<kStride>(plane_a, row + 8, k0 + 16 + t * 4);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int row = key0 + j * 8 + g;
      b[j][0] = plane_word<kStride>(plane_b, row, k0 + t * 4);
      b[j][1] = plane_word<kStride>(plane_b, row, k0 + 16 + t * 4);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) mma_16832_s8(acc[i][j], a[i], b[j]);
  }
}

template <int kShift>
__device__ __forceinline__ void scale_accumulators(int32_t (*acc)[4][4]) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] *= kShift;
}

// acc = the warp's 32 x 32 block of a~ . b~ for 12-bit vectors given as int8 high and low parts:
// ((high.high) 64 + high.low + low.high) 64 + low.low, exactly in int32.
template <int kHeadDim, int kStride>
__device__ __forceinline__ void split_products(int32_t (*acc)[4][4], const int8_t* a_high,
                                               const int8_t* a_low, const int8_t* b_high,
                                               const int8_t* b_low, int seg0, int key0) {
  accumulate_products<kHeadDim, kStride>(acc, a_high, b_high, seg0, key0);
  scale_accumulators<64>(acc);
  accumulate_products<kHeadDim, kStride>(acc, a_high, b_low, seg0, key0);
  accumulate_products<kHeadDim, kStride>(acc, a_low, b_high, seg0, key0);
  scale_accumulators<64>(acc);
  accumulate_products<kHeadDim, kStride>(acc, a_low, b_low, seg0, key0);
}

// Scores of 128 keys against 64 segments: the keys are quantised into shared memory (k~ and k2~,
// each split into high and low int8 parts), the segments' vectors come quantised from
// segment_vectors_kernel, and each warp computes 32 x 32 integer dot products on the tensor cores
// (r~ . k~ and c~ . k2~ in four int8 products each), then the scores. Blocks whose keys lie beyond
// all their segments' histories exit (the history is a triangle).
template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(HistoryScoresTile<kHeadDim>::kThreads)
    history_scores_kernel(const __grid_constant__ EstimateImportanceParams p) {
  using Tile = HistoryScoresTile<kHeadDim>;
  constexpr int kStride = Tile::kStride;
  const SegmentLayout& layout = p.layout;
  const int64_t num_segments = layout.num_segments();
  const int64_t seg_begin = int64_t(blockIdx.y) * Tile::kSegments;
  const int64_t seg_last = min(seg_begin + Tile::kSegments, num_segments) - 1;
  const int64_t key_begin = int64_t(blockIdx.x) * Tile::kKeys;
  const int64_t keys_seen = layout.history_length(seg_last);
  if (key_begin >= keys_seen) return;  // history grows with the segment
  const int bh = blockIdx.z, b = bh / p.ordering_heads, h = bh % p.ordering_heads;
  const int kv_head = p.order_per_kv_head ? h : h / p.group;
  const bool with_variance = p.variance_weight > 0.0f;

  extern __shared__ __align__(16) int8_t shared[];
  int8_t* seg_high = shared;
  int8_t* seg_low = seg_high + Tile::kSegmentPlane;
  int8_t* seg_variance_high = seg_low + Tile::kSegmentPlane;
  int8_t* seg_variance_low = seg_variance_high + Tile::kSegmentPlane;
  int8_t* key_high = seg_variance_low + Tile::kSegmentPlane;
  int8_t* key_low = key_high + Tile::kKeyPlane;
  int8_t* key_squared_high = key_low + Tile::kKeyPlane;
  int8_t* key_squared_low = key_squared_high + Tile::kKeyPlane;
  float* gain = reinterpret_cast<float*>(key_squared_low + Tile::kKeyPlane);  // [2][kHeadDim]
  const int tid = threadIdx.x;

  if (tid < kHeadDim) {
    const float bound = p.key_bounds[(int64_t(b) * p.kv_heads + kv_head) * kHeadDim + tid];
    gain[tid] = quantization_gain(bound);
    gain[kHeadDim + tid] = quantization_gain(__fmul_rn(bound, bound));
  }
  // The segments' quantised vectors: 16-byte copies, zeros past the last segment.
  constexpr int kChunks = kHeadDim / 16;  // 16-byte chunks per row
  const int64_t vectors = (int64_t(bh) * num_segments + seg_begin) * kHeadDim;
  for (int c = tid; c < Tile::kSegments * kChunks; c += Tile::kThreads) {
    const int row = c / kChunks, d = (c % kChunks) * 16;
    const bool valid = seg_begin + row < num_segments;
    const int64_t src = vectors + int64_t(row) * kHeadDim + d;
    const uint4 zero = make_uint4(0, 0, 0, 0);
    *reinterpret_cast<uint4*>(seg_high + row * kStride + d) =
        valid ? *reinterpret_cast<const uint4*>(p.mean_high + src) : zero;
    *reinterpret_cast<uint4*>(seg_low + row * kStride + d) =
        valid ? *reinterpret_cast<const uint4*>(p.mean_low + src) : zero;
    if (with_variance) {
      *reinterpret_cast<uint4*>(seg_variance_high + row * kStride + d) =
          valid ? *reinterpret_cast<const uint4*>(p.variance_high + src) : zero;
      *reinterpret_cast<uint4*>(seg_variance_low + row * kStride + d) =
          valid ? *reinterpret_cast<const uint4*>(p.variance_low + src) : zero;
    }
  }
  __syncthreads();  // the gains
  // The keys, 8 dimensions per step: quantised, split, squared; zeros past the seen keys.
  const Element* keys = static_cast<const Element*>(p.key) + b * p.k_strides.batch +
                        kv_head * p.k_strides.head;
  constexpr int kOctets = kHeadDim / 8;
  for (int c = tid; c < Tile::kKeys * kOctets; c += Tile::kThreads) {
    const int row = c / kOctets, d = (c % kOctets) * 8;
    const int64_t key = key_begin + row;
    uint4 raw = make_uint4(0, 0, 0, 0);
    if (key < keys_seen) raw = *reinterpret_cast<const uint4*>(keys + key * p.k_strides.row + d);
    const Element* e = reinterpret_cast<const Element*>(&raw);
    int8_t high[8], low[8], squared_high[8], squared_low[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float x = to_float(e[i]);
      split_levels(quantize(x, gain[d + i]), high + i, low + i);
      split_levels(quantize(__fmul_rn(x, x), gain[kHeadDim + d + i]), squared_high + i,
                   squared_low + i);
    }
    const int at = row * kStride + d;
    *reinterpret_cast<uint2*>(key_high + at) = *reinterpret_cast<const uint2*>(high);
    *reinterpret_cast<uint2*>(key_low + at) = *reinterpret_cast<const uint2*>(low);
    if (with_variance) {
      *reinterpret_cast<uint2*>(key_squared_high + at) =
          *reinterpret_cast<const uint2*>(squared_high);
      *reinterpret_cast<uint2*>(key_squared_low + at) =
          *reinterpret_cast<const uint2*>(squared_low);
    }
  }
  __syncthreads();

  const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int seg0 = (warp / 4) * 32, key0 = (warp % 4) * 32;
  int32_t mean[2][4][4] = {}, spread[2][4][4] = {};
  split_products<kHeadDim, kStride>(mean, seg_high, seg_low, key_high, key_low, seg0, key0);
  if (with_variance)
    split_products<kHeadDim, kStride>(spread, seg_variance_high, seg_variance_low,
                                      key_squared_high, key_squared_low, seg0, key0);

  float* out = p.scores + int64_t(bh) * layout.total_history();
  const int64_t steps = int64_t(bh) * num_segments;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t s = seg_begin + seg0 + i * 16 + g + half * 8;
      if (s >= num_segments) continue;
      const int64_t history = layout.history_length(s);
      const float mean_step = p.mean_steps[steps + s];
      const float variance_step = with_variance ? p.variance_steps[steps + s] : 0.0f;
      float* seg_out = out + layout.history_offset(s);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t key = key_begin + key0 + j * 8 + t * 2 + e;
          const int c = half * 2 + e;
          if (key < history)
            seg_out[key] = integer_score(mean[i][j][c], mean_step, with_variance,
                                         spread[i][j][c], variance_step);
        }
      }
    }
  }
}

}  // namespace s2o
