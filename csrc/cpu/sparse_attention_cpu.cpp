// CPU kernel of s2o::sparse_attention: the readable specification the CUDA kernel is tested
// against. One work unit is one query tile of block_m rows of one segment, for one query head,
// or for all G heads of a KV group when group_units (their rows stop together).
// A unit reads the ranked list of its KV head (order_per_kv_head) or of its query head. Per unit:
//   Pass 1 (causal only): the local keys [segment start, last row's position], densely, in tiles of
//     block_n keys starting at the segment start, masked by each row's own position.
//   Pass 2: the history in tiles of block_n keys taken from the ranked list in order, gathered by
//     index. After each tile, with gain_r the tile's softmax mass of row r and l_r the row's total
//     mass so far (same max frame), stop once max_r gain_r / l_r < threshold for `patience` tiles
//     in a row; with tail_threshold, the bar is min(threshold, tail_threshold / history tiles
//     left) (s2o/stop_rule.h).
// With unit_threshold, each unit head uses its own threshold; a negative one skips its units.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "ops.h"
#include "message.h"
#include "dispatch.h"
#include "s2o/layout.h"
#include "s2o/stop_rule.h"

namespace s2o {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

constexpr int64_t kRowBlock = 4;   // rows per register block of the score product
constexpr int64_t kColBlock = 16;  // keys per register block (two 8-wide vectors)
constexpr int64_t kAccRows = 2;    // rows per register block of the value product
constexpr int64_t kAccCols = 32;   // head-dim columns per register block (four 8-wide vectors)

struct AttentionShape {
  SegmentLayout layout;
  int64_t batch, q_heads, kv_heads, head_dim, group;
  int64_t ordering_heads;  // H_ord: ranked lists per batch entry
  int64_t unit_heads;      // query heads per work unit (G with group_units, else 1)
  int64_t units;           // work units per batch entry and query tile: Hq / unit_heads
  int64_t block_m, block_n, num_q_tiles;
  float threshold, tail_threshold, scale;  // tail_threshold: +inf when off
  int64_t patience;
  bool order_per_kv_head;
};

// Per-thread state of one work unit: rows r = g * block_m + i (head g of the unit, row i of the tile).
struct UnitState {
  std::vector<float> q;      // [rows][D], pre-scaled by `scale`
  std::vector<float> acc;    // [rows][D], unnormalised output
  std::vector<float> m, l;   // [rows] running max and mass
  std::vector<int64_t> pos;  // [rows] absolute position, or -1 for padding rows beyond Nq
  int64_t kt_ld;             // block_n rounded up to whole register blocks
  std::vector<float> kt;     // [D][kt_ld] current key tile, transposed
  std::vector<float> v;      // [block_n][D] current value tile
  std::vector<float> s;      // [rows][block_n] scores, then probabilities
  std::vector<float> alpha;  // [rows] rescale of acc for the current tile

  UnitState(int64_t rows, int64_t head_dim, int64_t block_n)
      : q(rows * head_dim), acc(rows * head_dim), m(rows), l(rows), pos(rows),
        kt_ld(ceil_div(block_n, kColBlock) * kColBlock), kt(head_dim * kt_ld),
        v(block_n * head_dim), s(rows * block_n),
        alpha(rows) {}
};

// Register-blocked fp32 tile products; the clones let the compiler use AVX2 + FMA where the CPU
// has them (results then differ from the default clone only by rounding).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define S2O_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define S2O_CPU_CLONES
#endif


// s[r][j] = q[r] . kt[:, j] for r < rows, j < n; q [rows][D], kt [D][ld_kt], s [rows][ld_s].
S2O_CPU_CLONES
void tile_scores(const float* q, const float* kt, int64_t rows, int64_t head_dim, int64_t n,
                 int64_t ld_kt, float* s, int64_t ld_s) {
  for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
    const int64_t nr = std::min(kRowBlock, rows - r0);
    for (int64_t j0 = 0; j0 < n; j0 += kColBlock) {
      float acc[kRowBlock][kColBlock] = {};
      for (int64_t d = 0; d < head_dim; ++d) {
        const float* kd = kt + d * ld_kt + j0;
        for (int64_t r = 0; r < kRowBlock; ++r) {
          const float qd = r < nr ? q[(r0 + r) * head_dim + d] : 0.0f;
          for (int64_t j = 0; j < kColBlock; ++j) acc[r][j] += qd * kd[j];
        }
      }
      const int64_t nj = std::min(kColBlock, n - j0);
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t j = 0; j < nj; ++j) s[(r0 + r) * ld_s + j0 + j] = acc[r][j];
    }
  }
}

// acc[r] = acc[r] * alpha[r] + sum_j p[r][j] * v[j] for r < rows; p [rows][ld_p], v [n][D]. A
// block of kAccRows x kAccCols outputs stays in registers over the whole key loop.
S2O_CPU_CLONES
void tile_accumulate(const float* p, int64_t ld_p, const float* v, const float* alpha,
                     int64_t rows, int64_t n, int64_t head_dim, float* acc) {
  for (int64_t r0 = 0; r0 < rows; r0 += kAccRows) {
    const int64_t nr = std::min(kAccRows, rows - r0);
    for (int64_t d0 = 0; d0 < head_dim; d0 += kAccCols) {
      const int64_t nd = std::min(kAccCols, head_dim - d0);
      float block[kAccRows][kAccCols] = {};
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t d = 0; d < nd; ++d) block[r][d] = acc[(r0 + r) * head_dim + d0 + d] * alpha[r0 + r];
      if (nd == kAccCols) {
        for (int64_t j = 0; j < n; ++j) {
          const float* vj = v + j * head_dim + d0;
          for (int64_t r = 0; r < kAccRows; ++r) {
            const float pj = r < nr ? p[(r0 + r) * ld_p + j] : 0.0f;
            for (int64_t d = 0; d < kAccCols; ++d) block[r][d] += pj * vj[d];
          }
        }
      } else {
        for (int64_t j = 0; j < n; ++j)
          for (int64_t r = 0; r < nr; ++r)
            for (int64_t d = 0; d < nd; ++d) block[r][d] += p[(r0 + r) * ld_p + j] * v[j * head_dim + d0 + d];
      }
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t d = 0; d < nd; ++d) acc[(r0 + r) * head_dim + d0 + d] = block[r][d];
    }
  }
}

// Folds one key tile (already in st.kt / st.v: `n` keys at absolute positions key_pos[j]) into
// every row; masks keys after the row's position when `causal_mask`. Returns the max over real
// rows of gain / l (NaN rows ignored).
float fold_tile(UnitState& st, const AttentionShape& shape, int64_t n, const int64_t* key_pos,
                bool causal_mask) {
  const int64_t D = shape.head_dim, bn = shape.block_n;
  const int64_t rows = shape.unit_heads * shape.block_m;
  tile_scores(st.q.data(), st.kt.data(), rows, D, n, st.kt_ld, st.s.data(), bn);
  float max_ratio = 0.0f;
  for (int64_t r = 0; r < rows; ++r) {
    float* s = st.s.data() + r * bn;
    if (st.pos[r] < 0) {  // padding row: contributes nothing
      std::fill(s, s + n, 0.0f);
      st.alpha[r] = 1.0f;
      continue;
    }
    float tile_max = kNegInf;
    for (int64_t j = 0; j < n; ++j) {
      if (causal_mask && key_pos[j] > st.pos[r]) s[j] = kNegInf;
      tile_max = std::fmax(tile_max, s[j]);
    }
    const float m_new = std::fmax(st.m[r], tile_max);
    const float frame = m_new == kNegInf ? 0.0f : m_new;  // all masked so far: keep exp() finite
    float gain = 0.0f;
    for (int64_t j = 0; j < n; ++j) {
      s[j] = std::exp(s[j] - frame);
      gain += s[j];
    }
    st.alpha[r] = std::exp(st.m[r] - frame);
    st.m[r] = m_new;
    st.l[r] = st.l[r] * st.alpha[r] + gain;
    if (st.l[r] > 0.0f) max_ratio = std::fmax(max_ratio, gain / st.l[r]);
  }
  tile_accumulate(st.s.data(), bn, st.v.data(), st.alpha.data(), rows, n, D, st.acc.data());
  return max_ratio;
}

template <typename scalar_t>
struct Operand {  // strided view of a [B, H, N, D] tensor
  const scalar_t* data;
  int64_t s0, s1, s2, s3;
  explicit Operand(const at::Tensor& t)
      : data(t.const_data_ptr<scalar_t>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)),
        s3(t.stride(3)) {}
  const scalar_t* row(int64_t b, int64_t h, int64_t n) const { return data + b * s0 + h * s1 + n * s2; }
};

template <typename scalar_t>
void load_tile(UnitState& st, const AttentionShape& shape, const Operand<scalar_t>& k,
               const Operand<scalar_t>& v, int64_t b, int64_t kv_head, const int64_t* key_pos,
               int64_t n) {
  const int64_t D = shape.head_dim;
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t* kr = k.row(b, kv_head, key_pos[j]);
    const scalar_t* vr = v.row(b, kv_head, key_pos[j]);
    for (int64_t d = 0; d < D; ++d) {
      st.kt[d * st.kt_ld + j] = static_cast<float>(kr[d * k.s3]);
      st.v[j * D + d] = static_cast<float>(vr[d * v.s3]);
    }
  }
}

template <typename scalar_t>
void sparse_attention_kernel(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                             const at::Tensor& indices, const float* unit_threshold, const AttentionShape& shape,
                             at::Tensor& out, at::Tensor& lse, at::Tensor& tile_counts) {
  const SegmentLayout& layout = shape.layout;
  const Operand<scalar_t> q(query), k(key), v(value);
  const int32_t* idx = indices.const_data_ptr<int32_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  float* lse_out = lse.mutable_data_ptr<float>();
  int32_t* counts = tile_counts.mutable_data_ptr<int32_t>();
  const int64_t D = shape.head_dim, bm = shape.block_m, bn = shape.block_n;
  const int64_t rows = shape.unit_heads * bm, total = layout.total_history();
  const int64_t num_units = shape.batch * shape.units * shape.num_q_tiles;

  at::parallel_for(0, num_units, 1, [&](int64_t begin, int64_t end) {
    UnitState st(rows, D, bn);
    std::vector<int64_t> key_pos(bn);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t tile = unit % shape.num_q_tiles;
      const int64_t h = (unit / shape.num_q_tiles) % shape.units;
      const int64_t b = unit / (shape.num_q_tiles * shape.units);
      const int64_t first_head = h * shape.unit_heads;
      const int64_t kv_head = first_head / shape.group;
      const int64_t list_head = shape.order_per_kv_head ? kv_head : first_head;
      const int64_t row_begin = tile * bm;
      const int64_t row_end = std::min(row_begin + bm, layout.num_queries);
      const int64_t segment = row_begin / layout.segment_size;
      const float threshold =
          unit_threshold ? unit_threshold[b * shape.units + h] : shape.threshold;
      if (threshold < 0.0f) {  // a skipped unit: nothing computed, nothing written
        counts[unit] = 0;
        continue;
      }

      // Unit row r is query row row_begin + r % bm of head first_head + r / bm (-1: past the
      // end of the queries).
      int64_t last_pos = -1;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t head = first_head + r / bm, slot = row_begin + r % bm;
        const int64_t i = slot < row_end ? slot : -1;
        st.pos[r] = i >= 0 ? i + layout.q_offset : -1;
        last_pos = std::max(last_pos, st.pos[r]);
        st.m[r] = kNegInf;
        st.l[r] = 0.0f;
        float* qr = st.q.data() + r * D;
        std::fill(st.acc.data() + r * D, st.acc.data() + (r + 1) * D, 0.0f);
        if (i < 0) continue;
        const scalar_t* src = q.row(b, head, i);
        for (int64_t d = 0; d < D; ++d) qr[d] = static_cast<float>(src[d * q.s3]) * shape.scale;
      }

      int32_t tiles = 0;
      if (layout.is_causal) {  // Pass 1: local keys, dense, causal mask on original positions
        const int64_t local_end = std::min(last_pos + 1, layout.num_keys);
        for (int64_t k0 = layout.segment_start(segment); k0 < local_end; k0 += bn) {
          const int64_t n = std::min(bn, local_end - k0);
          for (int64_t j = 0; j < n; ++j) key_pos[j] = k0 + j;
          load_tile(st, shape, k, v, b, kv_head, key_pos.data(), n);
          fold_tile(st, shape, n, key_pos.data(), /*causal_mask=*/true);
          ++tiles;
        }
      }
      // Pass 2: the ranked history, early-stopped.
      const int64_t history = layout.history_length(segment);
      const int32_t* ranked =
          idx + (b * shape.ordering_heads + list_head) * total + layout.history_offset(segment);
      const int64_t history_tiles = ceil_div(history, bn);
      int64_t quiet_tiles = 0;
      for (int64_t t0 = 0; t0 < history; t0 += bn) {
        const int64_t n = std::min(bn, history - t0);
        for (int64_t j = 0; j < n; ++j) {
          const int64_t key_index = ranked[t0 + j];
          S2O_CHECK(key_index >= 0 && key_index < history, "indices: entry ", key_index,
                      " is outside its segment's history [0, ", history, ")");
          key_pos[j] = key_index;
        }
        load_tile(st, shape, k, v, b, kv_head, key_pos.data(), n);
        const float max_ratio = fold_tile(st, shape, n, key_pos.data(), /*causal_mask=*/false);
        ++tiles;
        const float bar =
            tile_stop_threshold(threshold, shape.tail_threshold, history_tiles - t0 / bn - 1);
        quiet_tiles = max_ratio < bar ? quiet_tiles + 1 : 0;
        if (quiet_tiles >= shape.patience) break;
      }

      counts[unit] = tiles;
      for (int64_t r = 0; r < rows; ++r) {
        if (st.pos[r] < 0) continue;
        const int64_t head = first_head + r / bm, i = row_begin + r % bm;
        const int64_t row = (b * shape.q_heads + head) * layout.num_queries + i;
        const float* acc = st.acc.data() + r * D;
        for (int64_t d = 0; d < D; ++d) o[row * D + d] = static_cast<scalar_t>(acc[d] / st.l[r]);
        lse_out[row] = st.m[r] + std::log(st.l[r]);
      }
    }
  });
}

void sparse_attention_cpu(const SparseAttentionCall& call) {
  const at::Tensor& query = call.query;
  AttentionShape shape{call.layout};
  shape.batch = query.size(0);
  shape.q_heads = query.size(1);
  shape.kv_heads = call.key.size(1);
  shape.head_dim = query.size(3);
  shape.group = shape.q_heads / shape.kv_heads;
  shape.order_per_kv_head = call.order_per_kv_head;
  shape.ordering_heads = call.ordering_heads;
  shape.unit_heads = call.units.unit_heads;
  shape.units = call.units.units;
  shape.block_m = call.block_m;
  shape.block_n = call.block_n;
  shape.num_q_tiles = call.num_q_tiles;
  shape.threshold = call.threshold;
  shape.tail_threshold = call.tail_threshold;
  shape.patience = call.patience;
  shape.scale = static_cast<float>(call.scale);
  S2O_DISPATCH_CPU_FLOAT(query.scalar_type(), "sparse_attention", [&] {
    sparse_attention_kernel<scalar_t>(query, call.key, call.value, call.indices,
                                      call.unit_threshold, shape, call.out, call.lse,
                                      call.tile_counts);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(s2o, CPU, m) { m.impl("sparse_attention", &sparse_attention_op<sparse_attention_cpu, Kernels::kCpu>); }

}  // namespace s2o
