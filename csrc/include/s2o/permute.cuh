// Kernels of s2o::permute_indices. Torch-free.
//
// Each segment's history is ranked by falling rank key, equal keys in index order: exactly the CPU
// kernel's std::stable_sort. Two implementations:
// - rank_bits <= 12 (the default 12): a one-block-per-segment stable counting sort
//   (counting_rank_kernel), two reads of the scores and one write of the indices; it also ranks
//   only a prefix (ranked_keys > 0);
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
// With ranked_keys, only the bins holding the ranked_keys best keys (the prefix) are placed that way;
// the other keys (the tail) follow the prefix in index order: each warp writes its tail keys
// contiguously, from its own start after the prefix and the lower warps' tails.
//
// Both passes keep two batches of scores in flight per lane (the next one loads while this one is
// processed). Pass 2 writes the batch's tail keys at once (coalesced), stages its prefix keys in
// shared memory in index order, then ranks them 32 at a time: one match, one shared atomic claim
// per group of equal bins, one scattered write per key.
struct CountingRank {
  static constexpr int kBits = kCountingRankBits;
  static constexpr int kBins = 1 << kBits;
  static constexpr int kWarps = 4;  // 64 KiB of counters: three blocks per SM
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBatch = 16;  // scores per lane processed together
  static constexpr int kStride = 32 * kBatch;  // keys per batch of a warp
  static constexpr int kCounters = kBins * kWarps;
  // The scan gives each thread a run of kRun consecutive counters (kRun / kWarps bins); one
  // padding word after each run puts the runs' starts in distinct banks.
  static constexpr int kRun = kCounters / kThreads;
  static constexpr int kRunBins = kRun / kWarps;
  // Shared memory, in words: the counters (padded); per warp its total in the scan; one scratch
  // word per thread, the target of the shared atomics of lanes with nothing to claim (so every
  // atomic is issued by the whole warp without a branch); per warp the staged prefix keys of a
  // batch, (bin << kOffsetBits) | offset in the batch.
  static constexpr int kOffsetBits = 9;
  static constexpr int kWarpTotalsOffset = kCounters + kCounters / kRun;
  static constexpr int kScratchOffset = kWarpTotalsOffset + kWarps;
  static constexpr int kStageOffset = kScratchOffset + kThreads;
  static constexpr int kSmemWords = kStageOffset + kWarps * kStride;
  static constexpr int kSmemBytes = kSmemWords * int(sizeof(uint32_t));
  static_assert(kRun == 128, "runs of 128 words: one padding word shifts each by one bank");
  static_assert(kStride == 1 << kOffsetBits && kBits + kOffsetBits <= 32, "staged key packing");

  static __device__ __forceinline__ uint32_t slot(int bin, int warp) {
    const uint32_t flat = uint32_t(bin) * kWarps + uint32_t(warp);
    return flat + flat / kRun;
  }
};

// Sum of v over the block's threads (CountingRank::kThreads), for all of them.
__device__ __forceinline__ uint32_t block_sum(uint32_t v, uint32_t* partials) {
  using C = CountingRank;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
  __syncthreads();  // partials may still be read from an earlier call
  if (threadIdx.x % 32 == 0) partials[threadIdx.x / 32] = v;
  __syncthreads();
  uint32_t total = 0;
#pragma unroll
  for (int w = 0; w < C::kWarps; ++w) total += partials[w];
  return total;
}

__global__ void __launch_bounds__(CountingRank::kThreads)
    counting_rank_kernel(const float* scores, SegmentLayout layout, int rank_bits,
                         int64_t ranked_keys, int32_t* indices) {
  using C = CountingRank;
  constexpr int kStride = C::kStride;
  extern __shared__ uint32_t counters[];
  uint32_t* warp_totals = counters + C::kWarpTotalsOffset;
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
  const uint32_t scratch = C::kScratchOffset + tid;
  uint32_t* stage = counters + C::kStageOffset + warp * kStride;
  auto bin_of = [&](float score) { return int((top - rank_key(score, rank_bits)) << bin_shift); };
  // Keys of this lane's batch starting at j0 that lie in the range, as 32-bit arithmetic: the
  // lane's b-th key is in range when b * 32 < room.
  auto room_of = [&](int64_t j0) { return int(min(hi - j0 - lane, int64_t(kStride))); };
  auto load_batch = [&](float (&x)[C::kBatch], int64_t j0) {
    const int room = room_of(j0);
    const float* src = seg_scores + j0 + lane;
#pragma unroll
    for (int b = 0; b < C::kBatch; ++b) x[b] = b * 32 < room ? src[b * 32] : 0.0f;
  };
  // Calls process(x, j0) for each batch of the warp's range in order, x holding the batch's
  // scores; the next batch loads while this one is processed.
  auto for_each_batch = [&](auto&& process) {
    float x[C::kBatch], ahead[C::kBatch];
    load_batch(ahead, lo);
    for (int64_t j0 = lo; j0 < hi; j0 += kStride) {
#pragma unroll
      for (int b = 0; b < C::kBatch; ++b) x[b] = ahead[b];
      if (j0 + kStride < hi) load_batch(ahead, j0 + kStride);
      process(x, j0);
    }
  };
  __syncthreads();

  // Pass 1: per-warp counts.
  for_each_batch([&](const float (&x)[C::kBatch], int64_t j0) {
    const int room = room_of(j0);
#pragma unroll
    for (int b = 0; b < C::kBatch; ++b)
      atomicAdd(&counters[b * 32 < room ? C::slot(bin_of(x[b]), warp) : scratch], 1u);
  });
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

  // The prefix: bins below prefix_end, the bins that start before the ranked_keys-th position (so they
  // hold the ranked_keys best keys and all keys tied with the last of them). A bin starts at its
  // warp-0 counter.
  int prefix_end = C::kBins;
  uint32_t tail_begin = uint32_t(history);  // this warp's first tail position
  if (ranked_keys > 0 && ranked_keys < history) {
    uint32_t starting_before = 0;
    for (int i = 0; i < C::kRunBins; ++i) starting_before += run[i * C::kWarps] < ranked_keys;
    prefix_end = int(block_sum(starting_before, warp_totals));
    const uint32_t prefix_size = prefix_end < C::kBins ? counters[C::slot(prefix_end, 0)] : history;
    // Tail keys per warp: the counts of the bins from prefix_end on, from consecutive positions.
    const uint32_t next_run = tid + 1 < C::kThreads ? run[C::kRun + 1] : uint32_t(history);
    uint32_t tails[C::kWarps] = {};
    const int first_bin = tid * C::kRunBins;
    for (int i = 0; i < C::kRun; ++i) {
      const uint32_t count = (i + 1 < C::kRun ? run[i + 1] : next_run) - run[i];
      if (first_bin + i / C::kWarps >= prefix_end) tails[i % C::kWarps] += count;
    }
    tail_begin = prefix_size;
    for (int w = 0; w < C::kWarps; ++w) {
      const uint32_t tail = block_sum(tails[w], warp_totals);
      if (w < warp) tail_begin += tail;
    }
  }

  // Pass 2. Tail keys go to the warp's next tail positions in index order. Head keys are staged
  // in index order, then each goes to its warp's next position in its bin, after the lower lanes
  // of the same bin. Lanes past the range take a bin no key has and write nothing.
  constexpr int kNoBin = -1;
  constexpr uint32_t kOffsetMask = (1u << C::kOffsetBits) - 1u;
  for_each_batch([&](const float (&x)[C::kBatch], int64_t j0) {
    const int room = room_of(j0);
    int staged = 0;
#pragma unroll
    for (int b = 0; b < C::kBatch; ++b) {
      const bool in_range = b * 32 < room;
      const int bin = bin_of(x[b]);
      const bool in_prefix = in_range && bin < prefix_end, tail = in_range && bin >= prefix_end;
      const unsigned prefix_lanes = __ballot_sync(0xFFFFFFFFu, in_prefix);
      const unsigned tail_lanes = __ballot_sync(0xFFFFFFFFu, tail);
      if (in_prefix)
        stage[staged + __popc(prefix_lanes & lanes_below)] =
            (uint32_t(bin) << C::kOffsetBits) | uint32_t(b * 32 + lane);
      if (tail)
        seg_indices[tail_begin + __popc(tail_lanes & lanes_below)] = int32_t(j0 + b * 32 + lane);
      staged += __popc(prefix_lanes);
      tail_begin += __popc(tail_lanes);
    }
    __syncwarp();
    // The lowest lane of each group of equal bins claims the group's positions; the other lanes
    // add 0 to their scratch word. __syncwarp orders the claims of consecutive groups.
    for (int g = 0; g < staged; g += 32) {
      const bool valid = g + lane < staged;
      const uint32_t packed = valid ? stage[g + lane] : 0u;
      const int bin = valid ? int(packed >> C::kOffsetBits) : kNoBin;
      const unsigned peers = __match_any_sync(0xFFFFFFFFu, bin);
      const bool leader = valid && (peers & lanes_below) == 0;
      const uint32_t first = atomicAdd(&counters[leader ? C::slot(bin, warp) : scratch],
                                       leader ? uint32_t(__popc(peers)) : 0u);
      const uint32_t base = __shfl_sync(0xFFFFFFFFu, first, __ffs(peers) - 1);
      if (valid)
        seg_indices[base + __popc(peers & lanes_below)] = int32_t(j0 + (packed & kOffsetMask));
      __syncwarp();
    }
  });
}

}  // namespace s2o
