// CPU kernel of s2o::estimate_importance.
//
// The scores are computed in a fixed arithmetic order that the CUDA kernel reproduces exactly, so
// that both devices rank the history identically:
//   representative r[d] = (sum over the segment's rows, heads outer and rows inner, of q[d],
//                          added one by one in fp32) / count
//   score(j)            = fma chain over d = 0..D-1: acc = fma(r[d], k[j][d], acc), acc0 = 0
// With score_variance > 0 (weight w = score_variance x scale) the score gets a second-order term,
// continuing the same chain:
//   variance c[d]       = w * ((fma chain over the rows, same order: acc = fma(e, e, acc) with
//                          e = q[d] - r[d]) / count)
//   score(j)           += fma chain over d: acc = fma(c[d], k[j][d] * k[j][d], acc)
// (w = scale / 2 makes score * scale the Gaussian estimate of log sum_i exp(scale q_i . k_j).)
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "checks.h"
#include "cpu/parallel.h"
#include "ops.h"
#include "dispatch.h"
#include "s2o/layout.h"

namespace s2o {
namespace {

// Keys scored together, one accumulator lane each: the loop over d stays sequential per key (the
// canonical order) while the compiler vectorises across the lanes.
constexpr int64_t kKeyChunk = 16;

// Segments per call of score_chunk: their chains are independent, so the FMAs of one d overlap.
constexpr int64_t kSegmentGroup = 4;

// For the segments i < count of a group, out[i][j] = fma chain of r_i . kt[:, j] for j <
// kKeyChunk, continued by c_i . kt[:, j]^2 when with_variance; r_i is stats + i * 2 * head_dim,
// c_i follows it, kt is [head_dim][kKeyChunk]. Every clone gives identical, correctly rounded
// results (the default one through libm's fmaf).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v4", "fma", "default")))
#endif
void score_chunk(const float* stats, int64_t count, bool with_variance, const float* kt,
                 int64_t head_dim, float (*out)[kKeyChunk]) {
  float acc[kSegmentGroup][kKeyChunk] = {};
  for (int64_t d = 0; d < head_dim; ++d) {
    const float* row = kt + d * kKeyChunk;
    for (int64_t i = 0; i < kSegmentGroup; ++i) {
      const float rd = i < count ? stats[i * 2 * head_dim + d] : 0.0f;
      for (int64_t j = 0; j < kKeyChunk; ++j) acc[i][j] = std::fma(rd, row[j], acc[i][j]);
    }
  }
  if (with_variance) {
    for (int64_t d = 0; d < head_dim; ++d) {
      const float* row = kt + d * kKeyChunk;
      float squared[kKeyChunk];
      for (int64_t j = 0; j < kKeyChunk; ++j) squared[j] = row[j] * row[j];  // rounded to fp32
      for (int64_t i = 0; i < kSegmentGroup; ++i) {
        const float cd = i < count ? stats[i * 2 * head_dim + head_dim + d] : 0.0f;
        for (int64_t j = 0; j < kKeyChunk; ++j) acc[i][j] = std::fma(cd, squared[j], acc[i][j]);
      }
    }
  }
  for (int64_t i = 0; i < count; ++i)
    for (int64_t j = 0; j < kKeyChunk; ++j) out[i][j] = acc[i][j];
}

// Segments scored together (whole groups): each chunk of keys, converted once, serves all of them.
constexpr int64_t kSegmentBlock = 2 * kSegmentGroup;

// A segment's representative r (and variance c, when variance_weight > 0), in the order above.
template <typename scalar_t>
void segment_statistics(const scalar_t* q, int64_t qs1, int64_t qs2, int64_t qs3, int64_t heads,
                        int64_t row_begin, int64_t row_end, int64_t head_dim,
                        float variance_weight, float* r, float* c) {
  std::fill(r, r + head_dim, 0.0f);
  for (int64_t g = 0; g < heads; ++g)
    for (int64_t i = row_begin; i < row_end; ++i) {
      const scalar_t* row = q + g * qs1 + i * qs2;
      for (int64_t d = 0; d < head_dim; ++d) r[d] += static_cast<float>(row[d * qs3]);
    }
  const float count = static_cast<float>(heads * (row_end - row_begin));
  for (int64_t d = 0; d < head_dim; ++d) r[d] = r[d] / count;
  if (variance_weight <= 0.0f) return;
  std::fill(c, c + head_dim, 0.0f);
  for (int64_t g = 0; g < heads; ++g)
    for (int64_t i = row_begin; i < row_end; ++i) {
      const scalar_t* row = q + g * qs1 + i * qs2;
      for (int64_t d = 0; d < head_dim; ++d) {
        const float e = static_cast<float>(row[d * qs3]) - r[d];
        c[d] = std::fma(e, e, c[d]);
      }
    }
  for (int64_t d = 0; d < head_dim; ++d) c[d] = variance_weight * (c[d] / count);
}

template <typename scalar_t>
void estimate_importance_kernel(const at::Tensor& query, const at::Tensor& key,
                                const SegmentLayout& layout, bool order_per_kv_head,
                                float variance_weight, at::Tensor& scores) {
  const int64_t batch = query.size(0), head_dim = query.size(3);
  const int64_t group = query.size(1) / key.size(1);
  const int64_t ordering_heads = scores.size(1), num_segments = layout.num_segments();
  const int64_t heads_pooled = order_per_kv_head ? group : 1;
  const int64_t total = layout.total_history();
  const int64_t num_blocks = ceil_div(num_segments, kSegmentBlock);

  const scalar_t* q = query.const_data_ptr<scalar_t>();
  const scalar_t* k = key.const_data_ptr<scalar_t>();
  const int64_t qs0 = query.stride(0), qs1 = query.stride(1), qs2 = query.stride(2),
                qs3 = query.stride(3);
  const int64_t ks0 = key.stride(0), ks1 = key.stride(1), ks2 = key.stride(2), ks3 = key.stride(3);
  float* out = scores.mutable_data_ptr<float>();

  // Items: (batch, ordering head, block of segments), the longest histories first. Each chunk of
  // keys is converted to fp32 once per block and scored for all its segments.
  const int64_t items = num_blocks * batch * ordering_heads;
  const auto make_scratch = [&] {
    return std::vector<float>((2 * kSegmentBlock + kKeyChunk) * head_dim);
  };
  cpu::parallel_for_each(items, make_scratch, [&](std::vector<float>& scratch, int64_t item) {
    const int64_t block = num_blocks - 1 - item / (batch * ordering_heads);
    const int64_t h = item % ordering_heads, b = (item / ordering_heads) % batch;
    const int64_t first_head = order_per_kv_head ? h * group : h;
    const int64_t kv_head = order_per_kv_head ? h : h / group;
    const int64_t seg_begin = block * kSegmentBlock;
    const int64_t seg_end = std::min(seg_begin + kSegmentBlock, num_segments);
    float* kt = scratch.data() + 2 * kSegmentBlock * head_dim;  // [D][kKeyChunk]
    for (int64_t s = seg_begin; s < seg_end; ++s) {
      const int64_t row_begin = s * layout.segment_size;
      const int64_t row_end = std::min(row_begin + layout.segment_size, layout.num_queries);
      float* r = scratch.data() + (s - seg_begin) * 2 * head_dim;
      segment_statistics(q + b * qs0 + first_head * qs1, qs1, qs2, qs3, heads_pooled, row_begin,
                         row_end, head_dim, variance_weight, r, r + head_dim);
    }
    const scalar_t* kbase = k + b * ks0 + kv_head * ks1;
    float* list_scores = out + (b * ordering_heads + h) * total;
    float chunk_scores[kSegmentGroup][kKeyChunk];
    const int64_t longest = layout.history_length(seg_end - 1);
    for (int64_t j0 = 0; j0 < longest; j0 += kKeyChunk) {
      const int64_t n = std::min(kKeyChunk, longest - j0);
      for (int64_t j = 0; j < kKeyChunk; ++j) {
        const scalar_t* krow = kbase + (j0 + std::min(j, n - 1)) * ks2;
        for (int64_t d = 0; d < head_dim; ++d) kt[d * kKeyChunk + j] = static_cast<float>(krow[d * ks3]);
      }
      for (int64_t g0 = seg_begin; g0 < seg_end; g0 += kSegmentGroup) {
        // The group's segments that reach this chunk: a suffix (histories grow with the segment).
        const int64_t group_end = std::min(g0 + kSegmentGroup, seg_end);
        int64_t first = g0;
        while (first < group_end && layout.history_length(first) <= j0) ++first;
        const int64_t count = group_end - first;
        if (count == 0) continue;
        score_chunk(scratch.data() + (first - seg_begin) * 2 * head_dim, count,
                    variance_weight > 0.0f, kt, head_dim, chunk_scores);
        for (int64_t i = 0; i < count; ++i) {
          const int64_t s = first + i, history = layout.history_length(s);
          std::copy(chunk_scores[i], chunk_scores[i] + std::min(kKeyChunk, history - j0),
                    list_scores + layout.history_offset(s) + j0);
        }
      }
    }
  });
}

void estimate_importance_cpu(const EstimateImportanceCall& call) {
  S2O_DISPATCH_CPU_FLOAT(call.query.scalar_type(), "estimate_importance", [&] {
    estimate_importance_kernel<scalar_t>(call.query, call.key, call.layout, call.order_per_kv_head,
                                         call.variance_weight, call.scores);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(s2o, CPU, m) { m.impl("estimate_importance",
         &estimate_importance_op<estimate_importance_cpu, Kernels::kCpu>); }

}  // namespace s2o
