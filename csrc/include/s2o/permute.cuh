// Kernels of s2o::permute_indices. Torch-free.
//
// Each segment's history is ranked by a stable segmented radix sort of (inverted rank key, key
// index) pairs: falling rank key, equal keys in index order, exactly the CPU kernel's
// std::stable_sort. The rank key has rank_bits bits (16 by default: two 8-bit passes).
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

}  // namespace s2o
