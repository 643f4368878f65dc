// Kernels of s2o::permute_indices. Torch-free.
//
// Each segment's history is ranked by falling rank key, equal keys in index order: exactly the CPU
// kernel's std::stable_sort. Two implementations:
// - rank_bits <= 12 (the default 12): a one-block-per-segment stable counting sort
//   (counting_rank_kernel), two reads of the scores and one scattered write of the indices;
// - more bits: a stable segmented radix sort of (inverted rank key, key index) pairs (CUB).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "s2o/layout.h"
#include "s2o/ranking.h"

namespace s2o {

// One block per (segment, batch x ordering head): the inverted rank keys and the key indices to
// be permuted, and the segment's [begin, end) in the ragged layout.
template <typename SortKey>
__global__ void build_sort_keys_kernel(const float* scores, SegmentLayout layout, int rank_bits,
                                       SortKey* sort_keys, int32_t* key_indices,
                                       int32_t* segment_begin, int32_t* segment_end) {
  const int64_t s = blockIdx.x, bh = blockIdx.y;
  const int64_t begin = bh * layout.total_history() + layout.history_offset(s);
  const int64_t history = layout.history_length(s);
  const uint32_t mask = rank_bits == 32 ? 0xFFFFFFFFu : (1u << rank_bits) - 1u;
  if (threadIdx.x == 0) {
    const int64_t segment = bh * layout.num_segments() + s;
    segment_begin[segment] = int32_t(begin);
    segment_end[segment] = int32_t(begin + history);
  }
  for (int64_t j = threadIdx.x; j < history; j += blockDim.x) {
    sort_keys[begin + j] = SortKey(~rank_key(scores[begin + j], rank_bits) & mask);
    key_indices[begin + j] = int32_t(j);
  }
}

// Stable counting sort of each segment's history on rank keys of at most kBits bits.
//
// One block per (batch x ordering head, segment); each of its warps owns a contiguous share of the
// history and keeps its own counter per bin in shared memory. Pass 1 counts, a block-wide scan in
// (bin, warp) order turns the counts into each warp's first position per bin, and pass 2 places
// every key: within a warp, keys of equal bin (found with __match_any_sync) go in lane order. Bins
// run from the highest rank key down, warps own increasing index ranges and each warp walks its
// range in order, so the result is the stable order.
//
// Both passes keep two batches of scores in flight per lane (the next one loads while this one is
// processed). Pass 2 matches a whole batch, then claims its positions with shared atomics issued
// back to back, so no shared-memory round trip sits between two keys of a warp.
struct CountingRank {
  static constexpr int kBits = 12;
  static constexpr int kBins = 1 << kBits;
  static constexpr int kWarps = 4;  // 64 KiB of counters: three blocks per SM
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBatch = 16;  // scores per lane processed together
  static constexpr int kCounters = kBins * kWarps;
  // The scan gives each thread a run of kRun consecutive counters; one padding word after each run
  // puts the runs' starts in distinct banks.
  static constexpr int kRun = kCounters / kThreads;
  static constexpr int kSmemWords = kCounters + kCounters / kRun + kWarps;
  static constexpr int kSmemBytes = kSmemWords * int(sizeof(uint32_t));
  static_assert(kRun == 128, "runs of 128 words: one padding word shifts each by one bank");

  static __device__ __forceinline__ uint32_t slot(int bin, int warp) {
    const uint32_t flat = uint32_t(bin) * kWarps + uint32_t(warp);
    return flat + flat / kRun;
  }
};

__global__ void __launch_bounds__(CountingRank::kThreads)
    counting_rank_kernel(const float* scores, SegmentLayout layout, int rank_bits,
                         int32_t* indices) {
  using C = CountingRank;
  constexpr int kStride = 32 * C::kBatch;  // keys per batch of the warp
  extern __shared__ uint32_t counters[];
  uint32_t* warp_totals = counters + C::kSmemWords - C::kWarps;
  // Later segments have longer histories when causal: start them first, for all heads.
  const int64_t s = layout.num_segments() - 1 - blockIdx.y;
  const int64_t history = layout.history_length(s);
  if (history == 0) return;
  const int64_t begin = int64_t(blockIdx.x) * layout.total_history() + layout.history_offset(s);
  const float* seg_scores = scores + begin;
  int32_t* seg_indices = indices + begin;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  for (int i = tid; i < C::kSmemWords; i += C::kThreads) counters[i] = 0;
  const int64_t share = ceil_div(ceil_div(history, C::kWarps), 32) * 32;
  const int64_t lo = min(history, warp * share), hi = min(history, lo + share);
  const uint32_t top = (1u << rank_bits) - 1u;
  const int bin_shift = C::kBits - rank_bits;  // coarser keys use every 2^shift-th bin
  const unsigned lanes_below = (1u << lane) - 1u;
  auto bin_of = [&](float score) { return int((top - rank_key(score, rank_bits)) << bin_shift); };
  auto load_batch = [&](float (&x)[C::kBatch], int64_t j0) {
#pragma unroll
    for (int b = 0; b < C::kBatch; ++b) {
      const int64_t j = j0 + b * 32 + lane;
      x[b] = j < hi ? seg_scores[j] : 0.0f;
    }
  };
  __syncthreads();

  float x[C::kBatch], ahead[C::kBatch];
  // Pass 1: per-warp counts.
  load_batch(ahead, lo);
  for (int64_t j0 = lo; j0 < hi; j0 += kStride) {
#pragma unroll
    for (int b = 0; b < C::kBatch; ++b) x[b] = ahead[b];
    if (j0 + kStride < hi) load_batch(ahead, j0 + kStride);
#pragma unroll
    for (int b = 0; b < C::kBatch; ++b) {
      if (j0 + b * 32 + lane < hi) atomicAdd(&counters[C::slot(bin_of(x[b]), warp)], 1u);
    }
  }
  __syncthreads();

  // Exclusive scan over (bin, warp): thread t owns the run of counters [t * kRun, (t+1) * kRun).
  uint32_t* run = counters + tid * (C::kRun + 1);
  uint32_t run_total = 0;
  for (int i = 0; i < C::kRun; ++i) run_total += run[i];
  uint32_t inclusive = run_total;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const uint32_t other = __shfl_up_sync(0xFFFFFFFFu, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == 31) warp_totals[warp] = inclusive;
  __syncthreads();
  uint32_t position = inclusive - run_total;
  for (int w = 0; w < warp; ++w) position += warp_totals[w];
  for (int i = 0; i < C::kRun; ++i) {
    const uint32_t count = run[i];
    run[i] = position;
    position += count;
  }
  __syncthreads();

  // Pass 2: each key goes to its warp's next position in its bin, after the lower lanes of the
  // same bin. Lanes past the range take a bin no key has and write nothing.
  constexpr int kNoBin = -1;
  load_batch(ahead, lo);
  for (int64_t j0 = lo; j0 < hi; j0 += kStride) {
#pragma unroll
    for (int b = 0; b < C::kBatch; ++b) x[b] = ahead[b];
    if (j0 + kStride < hi) load_batch(ahead, j0 + kStride);
    int bins[C::kBatch];
    unsigned peers[C::kBatch];
#pragma unroll
    for (int b = 0; b < C::kBatch; ++b) {
      bins[b] = j0 + b * 32 + lane < hi ? bin_of(x[b]) : kNoBin;
      peers[b] = __match_any_sync(0xFFFFFFFFu, bins[b]);
    }
    // The lowest lane of each group of equal bins claims the group's positions. The claims of
    // the batch are issued back to back; __syncwarp orders them (it costs nothing in converged
    // code), so equal bins are claimed in iteration order.
    uint32_t first[C::kBatch];
#pragma unroll
    for (int b = 0; b < C::kBatch; ++b) {
      first[b] = 0;
      if (bins[b] != kNoBin && (peers[b] & lanes_below) == 0)
        first[b] = atomicAdd(&counters[C::slot(bins[b], warp)], uint32_t(__popc(peers[b])));
      __syncwarp();
    }
#pragma unroll
    for (int b = 0; b < C::kBatch; ++b) {
      const uint32_t base = __shfl_sync(0xFFFFFFFFu, first[b], __ffs(peers[b]) - 1);
      if (bins[b] != kNoBin)
        seg_indices[base + __popc(peers[b] & lanes_below)] = int32_t(j0 + b * 32 + lane);
    }
  }
}

}  // namespace s2o
