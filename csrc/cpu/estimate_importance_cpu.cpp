// CPU kernel of s2o::estimate_importance.
//
// The segment statistics are computed in a fixed fp32 order that the CUDA kernel reproduces
// exactly:
//   representative r[d] = (sum over the segment's rows, heads outer and rows inner, of q[d],
//                          added one by one in fp32) / count
// With score_variance > 0 (weight w = score_variance x scale) the score gets a second-order term:
//   variance c[d]       = w * ((fma chain over the rows, same order: acc = fma(e, e, acc) with
//                          e = q[d] - r[d]) / count)
// and the scores r . k[j] (+ c . k[j]^2) are integer products of quantised vectors
// (s2o/quantized_scores.h), exact in any order, so both devices rank the history identically.
// (w = scale / 2 makes score * scale the Gaussian estimate of log sum_i exp(scale q_i . k_j).)
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "checks.h"
#include "cpu/parallel.h"
#include "ops.h"
#include "dispatch.h"
#include "s2o/layout.h"
#include "s2o/limits.h"
#include "s2o/quantized_scores.h"

namespace s2o {
namespace {

// Keys scored together: one 16-lane vector of int32 sums.
constexpr int64_t kKeyChunk = 16;

// Segments per call of score_chunk: their sums are independent, so the products of one d overlap.
constexpr int64_t kSegmentGroup = 4;

// Quantised values are int16 and travel in pairs of consecutive dimensions (the last one padded
// with a zero dimension when D is odd): a key chunk's plane is [D / 2][kKeyChunk][2] int16, so
// that one multiply-add of 16-bit pairs (vpmaddwd) takes two dimensions of 16 keys.
int64_t dim_pairs(int64_t head_dim) { return (head_dim + 1) / 2; }

// A segment's quantised vectors (s2o/quantized_scores.h), each dimension pair packed in one
// int32 (low half: the even dimension): r~ and, with a variance term, c~, with their steps.
struct QuantizedSegment {
  const int32_t* mean;      // [D / 2]
  const int32_t* variance;  // [D / 2], read only with a variance term
  float mean_step, variance_step;
};

int32_t pack_pair(int32_t even, int32_t odd) {
  return static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint16_t>(even)) |
                              (static_cast<uint32_t>(static_cast<uint16_t>(odd)) << 16));
}

// sums[i][j] = the integer product of the packed vector vectors[i] with key j of a chunk's plane
// [pairs][kKeyChunk][2] (the caller points missing segments at zeros).
using ChunkSums = int32_t[kSegmentGroup][kKeyChunk];
void integer_products(const int32_t* const* vectors, const int16_t* plane, int64_t pairs,
                      ChunkSums& sums) {
  for (int64_t i = 0; i < kSegmentGroup; ++i)
    for (int64_t j = 0; j < kKeyChunk; ++j) {
      int32_t sum = 0;
      for (int64_t p = 0; p < pairs; ++p) {
        const int32_t packed = vectors[i][p];
        const int16_t* k = plane + (p * kKeyChunk + j) * 2;
        sum += int32_t(int16_t(packed & 0xffff)) * k[0] + int32_t(int16_t(packed >> 16)) * k[1];
      }
      sums[i][j] = sum;
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
// The same with AVX-512: one vpmaddwd per dimension pair and segment (exact: |a b + c d| < 2^23).
__attribute__((target("avx512f,avx512bw"))) void integer_products_avx512(
    const int32_t* const* vectors, const int16_t* plane, int64_t pairs, ChunkSums& sums) {
  __m512i acc[kSegmentGroup];
  for (int64_t i = 0; i < kSegmentGroup; ++i) acc[i] = _mm512_setzero_si512();
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512i keys = _mm512_loadu_si512(plane + p * kKeyChunk * 2);
    for (int64_t i = 0; i < kSegmentGroup; ++i)
      acc[i] = _mm512_add_epi32(acc[i], _mm512_madd_epi16(_mm512_set1_epi32(vectors[i][p]), keys));
  }
  for (int64_t i = 0; i < kSegmentGroup; ++i) _mm512_storeu_si512(sums[i], acc[i]);
}
#endif

using IntegerProducts = void (*)(const int32_t* const*, const int16_t*, int64_t, ChunkSums&);

// The AVX-512 products where the CPU has them (both give the same integers); S2O_CPU_AVX512=0
// forces the portable loops, e.g. to compare the two.
IntegerProducts pick_integer_products() {
#if defined(__x86_64__) && defined(__GNUC__)
  const char* env = std::getenv("S2O_CPU_AVX512");
  const bool allowed = env == nullptr || std::string(env) != "0";
  if (allowed && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))
    return integer_products_avx512;
#endif
  return integer_products;
}

// Segments scored together (whole groups): each chunk of keys serves all of them.
constexpr int64_t kSegmentBlock = 2 * kSegmentGroup;

// The packed pairs of v~ = quantize(v[d] * bound[d]) with its own bound max_d |v[d] * bound[d]|
// (quantized_scores.h); returns the product step.
float quantize_segment_vector(const float* v, const float* bound, int64_t head_dim,
                              int32_t* levels_scratch, int32_t* out) {
  float largest = 0.0f;
  for (int64_t d = 0; d < head_dim; ++d) largest = std::fmax(largest, std::fabs(v[d] * bound[d]));
  const float gain = quantization_gain(largest);
  for (int64_t d = 0; d < head_dim; ++d)
    levels_scratch[d] = quantize(v[d] * bound[d], gain);
  for (int64_t p = 0; p < dim_pairs(head_dim); ++p)
    out[p] = pack_pair(levels_scratch[2 * p], 2 * p + 1 < head_dim ? levels_scratch[2 * p + 1] : 0);
  return dequantization_step(largest);
}

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

// Per (batch, KV head) and dimension, the bound m[d] = max |k[j][d]| over all keys: [B * Hkv * D].
template <typename scalar_t>
std::vector<float> key_bounds(const at::Tensor& key) {
  const int64_t batch = key.size(0), kv_heads = key.size(1), keys = key.size(2),
                head_dim = key.size(3);
  const scalar_t* k = key.const_data_ptr<scalar_t>();
  std::vector<float> bounds(batch * kv_heads * head_dim, 0.0f);
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const scalar_t* rows = k + (bh / kv_heads) * key.stride(0) + (bh % kv_heads) * key.stride(1);
      float* bound = bounds.data() + bh * head_dim;
      for (int64_t j = 0; j < keys; ++j)
        for (int64_t d = 0; d < head_dim; ++d) {
          const float x = static_cast<float>(rows[j * key.stride(2) + d * key.stride(3)]);
          bound[d] = std::fmax(bound[d], std::fabs(x));
        }
    }
  });
  return bounds;
}

// The keys' quantised planes: per (batch, KV head) and chunk of kKeyChunk keys
// [D / 2][kKeyChunk][2] int16, k~ and (with a variance term) k2~; keys past the last are zeros.
struct KeyPlanes {
  std::vector<int16_t> mean, variance;
  int64_t chunks, pairs;
  const int16_t* chunk(const std::vector<int16_t>& plane, int64_t bh, int64_t c) const {
    return plane.data() + (bh * chunks + c) * pairs * kKeyChunk * 2;
  }
};

template <typename scalar_t>
KeyPlanes quantize_keys(const at::Tensor& key, const std::vector<float>& bounds, int64_t keys,
                        bool with_variance) {
  const int64_t kv_heads = key.size(1), head_dim = key.size(3);
  const int64_t heads = key.size(0) * kv_heads;
  KeyPlanes planes{{}, {}, ceil_div(keys, kKeyChunk), dim_pairs(head_dim)};
  const int64_t chunk_size = planes.pairs * kKeyChunk * 2;
  planes.mean.assign(heads * planes.chunks * chunk_size, 0);
  if (with_variance) planes.variance.assign(planes.mean.size(), 0);
  const scalar_t* k = key.const_data_ptr<scalar_t>();
  // Per (batch, KV head) and dimension the gains of k~ and k2~: [heads][2][D], divided once.
  std::vector<float> gains(heads * 2 * head_dim);
  for (int64_t bh = 0; bh < heads; ++bh)
    for (int64_t d = 0; d < head_dim; ++d) {
      const float bound = bounds[bh * head_dim + d];
      gains[(bh * 2) * head_dim + d] = quantization_gain(bound);
      gains[(bh * 2 + 1) * head_dim + d] = quantization_gain(bound * bound);
    }
  at::parallel_for(0, heads * planes.chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / planes.chunks, c = item % planes.chunks;
      const float* gain = gains.data() + bh * 2 * head_dim;
      const float* squared_gain = gain + head_dim;
      const scalar_t* rows = k + (bh / kv_heads) * key.stride(0) + (bh % kv_heads) * key.stride(1);
      int16_t* mean = planes.mean.data() + item * chunk_size;
      int16_t* variance = with_variance ? planes.variance.data() + item * chunk_size : nullptr;
      for (int64_t j = 0; j < std::min(kKeyChunk, keys - c * kKeyChunk); ++j)
        for (int64_t d = 0; d < head_dim; ++d) {
          const int64_t row = (c * kKeyChunk + j) * key.stride(2);
          const float x = static_cast<float>(rows[row + d * key.stride(3)]);
          const int64_t at = ((d / 2) * kKeyChunk + j) * 2 + d % 2;
          mean[at] = int16_t(quantize(x, gain[d]));
          if (with_variance) variance[at] = int16_t(quantize(x * x, squared_gain[d]));
        }
    }
  });
  return planes;
}

// Per-thread buffers of one work item.
struct ScoringScratch {
  std::vector<float> statistics;   // [kSegmentBlock][2][D]: r, c
  std::vector<int32_t> levels;     // [D]
  std::vector<int32_t> quantized;  // [kSegmentBlock][2][D / 2]: r~, c~ packed
  std::vector<QuantizedSegment> segments;  // [kSegmentBlock]
};

template <typename scalar_t>
void estimate_importance_kernel(const at::Tensor& query, const at::Tensor& key,
                                const SegmentLayout& layout, bool order_per_kv_head,
                                float variance_weight, at::Tensor& scores) {
  const int64_t batch = query.size(0), head_dim = query.size(3), kv_heads = key.size(1);
  const int64_t group = query.size(1) / kv_heads;
  const int64_t ordering_heads = scores.size(1), num_segments = layout.num_segments();
  const int64_t heads_pooled = order_per_kv_head ? group : 1;
  const int64_t total = layout.total_history();
  const int64_t num_blocks = ceil_div(num_segments, kSegmentBlock);
  const bool with_variance = variance_weight > 0.0f;
  if (total == 0) return;

  const scalar_t* q = query.const_data_ptr<scalar_t>();
  const int64_t qs0 = query.stride(0), qs1 = query.stride(1), qs2 = query.stride(2),
                qs3 = query.stride(3);
  float* out = scores.mutable_data_ptr<float>();
  const std::vector<float> bounds = key_bounds<scalar_t>(key);
  // The keys some segment sees: the last segment's history is the longest.
  const KeyPlanes planes = quantize_keys<scalar_t>(
      key, bounds, layout.history_length(num_segments - 1), with_variance);
  const int64_t pairs = planes.pairs;
  const IntegerProducts products = pick_integer_products();

  // Items: (batch, ordering head, block of segments), the longest histories first.
  const int64_t items = num_blocks * batch * ordering_heads;
  const auto make_scratch = [&] {
    return ScoringScratch{std::vector<float>(2 * kSegmentBlock * head_dim),
                          std::vector<int32_t>(head_dim),
                          std::vector<int32_t>((2 * kSegmentBlock + 1) * pairs, 0),
                          std::vector<QuantizedSegment>(kSegmentBlock)};
  };
  cpu::parallel_for_each(items, make_scratch, [&](ScoringScratch& scratch, int64_t item) {
    const int64_t block = num_blocks - 1 - item / (batch * ordering_heads);
    const int64_t h = item % ordering_heads, b = (item / ordering_heads) % batch;
    const int64_t first_head = order_per_kv_head ? h * group : h;
    const int64_t kv_head = order_per_kv_head ? h : h / group;
    const int64_t bh = b * kv_heads + kv_head;
    const int64_t seg_begin = block * kSegmentBlock;
    const int64_t seg_end = std::min(seg_begin + kSegmentBlock, num_segments);
    const float* bound = bounds.data() + bh * head_dim;
    float squared_bound[kCpuMaxHeadDim];  // as the CUDA kernel rounds them
    for (int64_t d = 0; d < head_dim; ++d) squared_bound[d] = bound[d] * bound[d];
    const int32_t* zeros = scratch.quantized.data() + 2 * kSegmentBlock * pairs;
    for (int64_t s = seg_begin; s < seg_end; ++s) {
      const int64_t row_begin = s * layout.segment_size;
      const int64_t row_end = std::min(row_begin + layout.segment_size, layout.num_queries);
      float* r = scratch.statistics.data() + (s - seg_begin) * 2 * head_dim;
      segment_statistics(q + b * qs0 + first_head * qs1, qs1, qs2, qs3, heads_pooled, row_begin,
                         row_end, head_dim, variance_weight, r, r + head_dim);
      int32_t* quantized = scratch.quantized.data() + (s - seg_begin) * 2 * pairs;
      QuantizedSegment& segment = scratch.segments[s - seg_begin];
      segment.mean = quantized;
      segment.variance = with_variance ? quantized + pairs : zeros;
      segment.mean_step =
          quantize_segment_vector(r, bound, head_dim, scratch.levels.data(), quantized);
      segment.variance_step =
          with_variance ? quantize_segment_vector(r + head_dim, squared_bound, head_dim,
                                                  scratch.levels.data(), quantized + pairs)
                        : 0.0f;
    }
    float* list_scores = out + (b * ordering_heads + h) * total;
    ChunkSums mean, spread;
    const int64_t longest = layout.history_length(seg_end - 1);
    for (int64_t j0 = 0; j0 < longest; j0 += kKeyChunk) {
      const int64_t c = j0 / kKeyChunk;
      for (int64_t g0 = seg_begin; g0 < seg_end; g0 += kSegmentGroup) {
        // The group's segments that reach this chunk: a suffix (histories grow with the segment).
        const int64_t group_end = std::min(g0 + kSegmentGroup, seg_end);
        int64_t first = g0;
        while (first < group_end && layout.history_length(first) <= j0) ++first;
        const int64_t count = group_end - first;
        if (count == 0) continue;
        const QuantizedSegment* segments = scratch.segments.data() + (first - seg_begin);
        const int32_t* mean_vectors[kSegmentGroup];
        const int32_t* variance_vectors[kSegmentGroup];
        for (int64_t i = 0; i < kSegmentGroup; ++i) {
          mean_vectors[i] = i < count ? segments[i].mean : zeros;
          variance_vectors[i] = i < count ? segments[i].variance : zeros;
        }
        products(mean_vectors, planes.chunk(planes.mean, bh, c), pairs, mean);
        if (with_variance)
          products(variance_vectors, planes.chunk(planes.variance, bh, c), pairs, spread);
        for (int64_t i = 0; i < count; ++i) {
          const int64_t s = first + i, n = std::min(kKeyChunk, layout.history_length(s) - j0);
          float* seg_out = list_scores + layout.history_offset(s) + j0;
          for (int64_t j = 0; j < n; ++j)
            seg_out[j] = integer_score(mean[i][j], segments[i].mean_step, with_variance,
                                       with_variance ? spread[i][j] : 0, segments[i].variance_step);
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
