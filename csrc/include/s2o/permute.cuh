// Kernels of s2o::permute_indices. Torch-free.
//
// All segments of all (batch, ordering head) pairs are ranked by one stable radix sort on a
// composite key: (segment number << rank_bits) | (inverted rank key). The sort keeps segments in
// their ragged order, puts each segment's keys by falling rank key, and (being stable) keeps
// equal rank keys in index order — exactly the CPU kernel's std::stable_sort.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "s2o/layout.h"
#include "s2o/ranking.h"

namespace s2o {

// One block per (segment, batch x ordering head): sort keys and the key indices to be permuted.
template <typename SortKey>
__global__ void build_sort_keys_kernel(const float* scores, SegmentLayout layout, int rank_bits,
                                       SortKey* sort_keys, int32_t* key_indices) {
  const int64_t s = blockIdx.x, bh = blockIdx.y;
  const int64_t num_segments = layout.num_segments();
  const int64_t begin = bh * layout.total_history() + layout.history_offset(s);
  const int64_t history = layout.history_length(s);
  const SortKey segment = SortKey(uint64_t(bh * num_segments + s) << rank_bits);
  const uint32_t mask = rank_bits == 32 ? 0xFFFFFFFFu : (1u << rank_bits) - 1u;
  for (int64_t j = threadIdx.x; j < history; j += blockDim.x) {
    sort_keys[begin + j] = segment | SortKey(~rank_key(scores[begin + j], rank_bits) & mask);
    key_indices[begin + j] = int32_t(j);
  }
}

}  // namespace s2o
