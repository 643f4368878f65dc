// CPU kernel of s2o::permute_indices: per segment, its history keys by falling rank key
// (csrc/include/s2o/ranking.h), ties by lower key index; with ranked_keys, only a prefix is ranked
// and the other keys follow in index order.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "checks.h"
#include "ops.h"
#include "message.h"
#include "s2o/layout.h"
#include "s2o/ranking.h"

namespace s2o {
namespace {

// Rank keys of at most this many bits are ranked by a counting sort (one bucket per key value),
// wider ones by comparison sorts; both give the same list.
constexpr int kCountingSortBits = 16;

// Writes the ranked list of one segment (keys: its history's rank keys) to `list`.
void rank_list(const std::vector<uint32_t>& keys, int64_t ranked_keys, std::vector<uint32_t>& sorted,
               int32_t* list) {
  const int64_t history = static_cast<int64_t>(keys.size());
  // The prefix: keys at or above the ranked_keys-th largest key (all keys when the prefix is the
  // whole history).
  uint32_t prefix_min = 0;
  if (ranked_keys > 0 && ranked_keys < history) {
    sorted.assign(keys.begin(), keys.end());
    std::nth_element(sorted.begin(), sorted.begin() + (ranked_keys - 1), sorted.end(),
                     std::greater<uint32_t>());
    prefix_min = sorted[ranked_keys - 1];
  }
  int32_t* prefix_end = list;
  for (int64_t j = 0; j < history; ++j)
    if (keys[j] >= prefix_min) *prefix_end++ = static_cast<int32_t>(j);
  int32_t* tail = prefix_end;
  for (int64_t j = 0; j < history; ++j)
    if (keys[j] < prefix_min) *tail++ = static_cast<int32_t>(j);
  std::stable_sort(list, prefix_end, [&](int32_t a, int32_t b) { return keys[a] > keys[b]; });
}

// The same list by counting sort, for keys below 2^bits (bits <= kCountingSortBits); `count` is
// scratch of 2^bits entries.
void rank_list_counting(const std::vector<uint32_t>& keys, int bits, int64_t ranked_keys,
                        std::vector<int64_t>& count, int32_t* list) {
  const int64_t history = static_cast<int64_t>(keys.size());
  const int64_t buckets = int64_t{1} << bits;
  std::fill(count.begin(), count.end(), 0);
  for (int64_t j = 0; j < history; ++j) ++count[buckets - 1 - keys[j]];  // falling key order
  // The prefix ends with the bucket that holds the ranked_keys-th largest key.
  int64_t prefix_buckets = buckets, prefix_size = history, start = 0;
  for (int64_t bucket = 0; bucket < buckets; ++bucket) {
    const int64_t size = count[bucket];
    count[bucket] = start;  // now: the bucket's first slot
    start += size;
    if (ranked_keys > 0 && start >= ranked_keys && prefix_buckets == buckets) {
      prefix_buckets = bucket + 1;
      prefix_size = start;
    }
  }
  int64_t tail = prefix_size;
  for (int64_t j = 0; j < history; ++j) {
    const int64_t bucket = buckets - 1 - keys[j];
    list[bucket < prefix_buckets ? count[bucket]++ : tail++] = static_cast<int32_t>(j);
  }
}

void permute_indices_cpu(const PermuteIndicesCall& call) {
  const SegmentLayout& layout = call.layout;
  const at::Tensor& scores = call.scores;
  const int64_t ranked_keys = call.ranked_keys;
  const int64_t total = layout.total_history();

  const float* in = scores.const_data_ptr<float>();
  int32_t* out = call.indices.mutable_data_ptr<int32_t>();
  const int64_t num_segments = layout.num_segments();
  const int bits = static_cast<int>(call.rank_bits);

  at::parallel_for(0, scores.size(0) * scores.size(1) * num_segments, 1,
                   [&](int64_t begin, int64_t end) {
                     std::vector<uint32_t> keys, sorted;
                     std::vector<int64_t> count(bits <= kCountingSortBits ? int64_t{1} << bits : 0);
                     for (int64_t unit = begin; unit < end; ++unit) {
                       const int64_t s = unit % num_segments;
                       const int64_t list_base = (unit / num_segments) * total;
                       const int64_t offset = list_base + layout.history_offset(s);
                       const int64_t history = layout.history_length(s);
                       keys.resize(history);
                       for (int64_t j = 0; j < history; ++j) keys[j] = rank_key(in[offset + j], bits);
                       if (bits <= kCountingSortBits)
                         rank_list_counting(keys, bits, ranked_keys, count, out + offset);
                       else
                         rank_list(keys, ranked_keys, sorted, out + offset);
                     }
                   });
}

}  // namespace

TORCH_LIBRARY_IMPL(s2o, CPU, m) { m.impl("permute_indices", &permute_indices_op<permute_indices_cpu>); }

}  // namespace s2o
