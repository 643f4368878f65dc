// CPU kernel of s2o::permute_indices: per segment, its history keys by falling rank key
// (csrc/include/s2o/ranking.h), ties by lower key index.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "checks.h"
#include "message.h"
#include "s2o/layout.h"
#include "s2o/ranking.h"

namespace s2o {
namespace {

at::Tensor permute_indices_cpu(const at::Tensor& scores, int64_t num_queries, int64_t num_keys,
                               int64_t segment_size, int64_t q_offset, bool is_causal,
                               int64_t rank_bits) {
  const SegmentLayout layout = check_permute_args(scores, num_queries, num_keys, segment_size,
                                                  q_offset, is_causal, rank_bits);
  const int64_t total = layout.total_history();

  const at::Tensor scores_c = scores.contiguous();
  at::Tensor indices = at::empty(scores.sizes(), scores.options().dtype(at::kInt));
  const float* in = scores_c.const_data_ptr<float>();
  int32_t* out = indices.mutable_data_ptr<int32_t>();
  const int64_t num_segments = layout.num_segments();
  const int bits = static_cast<int>(rank_bits);

  at::parallel_for(0, scores.size(0) * scores.size(1) * num_segments, 1,
                   [&](int64_t begin, int64_t end) {
                     std::vector<uint32_t> keys;
                     for (int64_t unit = begin; unit < end; ++unit) {
                       const int64_t s = unit % num_segments;
                       const int64_t head_base = (unit / num_segments) * total;
                       const int64_t offset = head_base + layout.history_offset(s);
                       const int64_t history = layout.history_length(s);
                       keys.resize(history);
                       for (int64_t j = 0; j < history; ++j) keys[j] = rank_key(in[offset + j], bits);
                       int32_t* list = out + offset;
                       std::iota(list, list + history, 0);
                       std::stable_sort(list, list + history,
                                        [&](int32_t a, int32_t b) { return keys[a] > keys[b]; });
                     }
                   });
  return indices;
}

}  // namespace

TORCH_LIBRARY_IMPL(s2o, CPU, m) { m.impl("permute_indices", &permute_indices_cpu); }

}  // namespace s2o
