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

#include <cmath>
#include <vector>

#include "checks.h"
#include "ops.h"
#include "dispatch.h"
#include "s2o/layout.h"

namespace s2o {
namespace {

// Keys scored together, one accumulator lane each: the loop over d stays sequential per key (the
// canonical order) while the compiler vectorises across the lanes.
constexpr int64_t kKeyChunk = 16;

// out[j] = fma chain of r . kt[:, j] for j < kKeyChunk, continued by c . kt[:, j]^2 when c is
// not null; kt is [head_dim][kKeyChunk]. The fma clone and the default one (libm fmaf) give
// identical, correctly rounded results.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("fma", "default")))
#endif
void score_chunk(const float* r, const float* c, const float* kt, int64_t head_dim, float* out) {
  float acc[kKeyChunk] = {};
  for (int64_t d = 0; d < head_dim; ++d) {
    const float rd = r[d];
    const float* row = kt + d * kKeyChunk;
    for (int64_t j = 0; j < kKeyChunk; ++j) acc[j] = std::fma(rd, row[j], acc[j]);
  }
  if (c != nullptr) {
    for (int64_t d = 0; d < head_dim; ++d) {
      const float cd = c[d];
      const float* row = kt + d * kKeyChunk;
      for (int64_t j = 0; j < kKeyChunk; ++j) {
        const float squared = row[j] * row[j];  // rounded to fp32 before the fma
        acc[j] = std::fma(cd, squared, acc[j]);
      }
    }
  }
  for (int64_t j = 0; j < kKeyChunk; ++j) out[j] = acc[j];
}

template <typename scalar_t>
void estimate_importance_kernel(const at::Tensor& query, const at::Tensor& key,
                                const SegmentLayout& layout, bool order_per_kv_head,
                                float variance_weight, at::Tensor& scores) {
  const int64_t batch = query.size(0), q_heads = query.size(1), head_dim = query.size(3);
  const int64_t group = q_heads / key.size(1);
  const int64_t ordering_heads = scores.size(1), num_segments = layout.num_segments();
  const int64_t heads_pooled = order_per_kv_head ? group : 1;
  const int64_t total = layout.total_history();

  const scalar_t* q = query.const_data_ptr<scalar_t>();
  const scalar_t* k = key.const_data_ptr<scalar_t>();
  const int64_t qs0 = query.stride(0), qs1 = query.stride(1), qs2 = query.stride(2),
                qs3 = query.stride(3);
  const int64_t ks0 = key.stride(0), ks1 = key.stride(1), ks2 = key.stride(2), ks3 = key.stride(3);
  float* out = scores.mutable_data_ptr<float>();

  at::parallel_for(0, batch * ordering_heads * num_segments, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kt(head_dim * kKeyChunk);
    std::vector<float> representative(head_dim), variance(head_dim);
    float chunk_scores[kKeyChunk];
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t s = unit % num_segments;
      const int64_t h = (unit / num_segments) % ordering_heads;
      const int64_t b = unit / (num_segments * ordering_heads);
      const int64_t first_head = order_per_kv_head ? h * group : h;
      const int64_t kv_head = order_per_kv_head ? h : h / group;
      const int64_t row_begin = s * layout.segment_size;
      const int64_t row_end = std::min(row_begin + layout.segment_size, layout.num_queries);

      float* r = representative.data();
      std::fill(r, r + head_dim, 0.0f);
      for (int64_t g = 0; g < heads_pooled; ++g) {
        for (int64_t i = row_begin; i < row_end; ++i) {
          const scalar_t* row = q + b * qs0 + (first_head + g) * qs1 + i * qs2;
          for (int64_t d = 0; d < head_dim; ++d) r[d] += static_cast<float>(row[d * qs3]);
        }
      }
      const float count = static_cast<float>(heads_pooled * (row_end - row_begin));
      for (int64_t d = 0; d < head_dim; ++d) r[d] = r[d] / count;
      if (variance_weight > 0.0f) {
        std::fill(variance.begin(), variance.end(), 0.0f);
        for (int64_t g = 0; g < heads_pooled; ++g) {
          for (int64_t i = row_begin; i < row_end; ++i) {
            const scalar_t* row = q + b * qs0 + (first_head + g) * qs1 + i * qs2;
            for (int64_t d = 0; d < head_dim; ++d) {
              const float e = static_cast<float>(row[d * qs3]) - r[d];
              variance[d] = std::fma(e, e, variance[d]);
            }
          }
        }
        for (int64_t d = 0; d < head_dim; ++d) variance[d] = variance_weight * (variance[d] / count);
      }

      const int64_t history = layout.history_length(s);
      float* seg_scores = out + (b * ordering_heads + h) * total + layout.history_offset(s);
      const scalar_t* kbase = k + b * ks0 + kv_head * ks1;
      for (int64_t j0 = 0; j0 < history; j0 += kKeyChunk) {
        const int64_t n = std::min(kKeyChunk, history - j0);
        for (int64_t j = 0; j < kKeyChunk; ++j) {
          const scalar_t* krow = kbase + (j0 + std::min(j, n - 1)) * ks2;
          for (int64_t d = 0; d < head_dim; ++d) kt[d * kKeyChunk + j] = static_cast<float>(krow[d * ks3]);
        }
        score_chunk(r, variance_weight > 0.0f ? variance.data() : nullptr, kt.data(), head_dim,
                    chunk_scores);
        std::copy(chunk_scores, chunk_scores + n, seg_scores + j0);
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
