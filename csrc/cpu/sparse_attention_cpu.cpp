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
// The tile products run on the matrix units for bf16 where the CPU has them, in fp32 loops
// otherwise (attention_tiles.h). Threads take units from a shared counter, the longest histories
// first, since early stopping makes their cost uneven.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "checks.h"
#include "cpu/attention_tiles.h"
#include "cpu/parallel.h"
#include "ops.h"
#include "message.h"
#include "dispatch.h"
#include "s2o/layout.h"
#include "s2o/stop_rule.h"

namespace s2o {
namespace {

using cpu::Operand;

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

template <typename Tiles, typename scalar_t>
void sparse_attention_kernel(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                             const at::Tensor& indices, const float* unit_threshold,
                             const AttentionShape& shape, at::Tensor& out, at::Tensor& lse,
                             at::Tensor& tile_counts) {
  const SegmentLayout& layout = shape.layout;
  const Operand<scalar_t> q(query), k(key), v(value);
  const int32_t* idx = indices.const_data_ptr<int32_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  float* lse_out = lse.mutable_data_ptr<float>();
  int32_t* counts = tile_counts.mutable_data_ptr<int32_t>();
  const int64_t D = shape.head_dim, bm = shape.block_m, bn = shape.block_n;
  const int64_t rows = shape.unit_heads * bm, total = layout.total_history();
  const int64_t units_per_tile = shape.batch * shape.units;

  // Units in order of falling query tile: the later a tile, the longer its history.
  const auto make_tiles = [&] {
    return Tiles(rows, shape.head_dim, shape.block_n, shape.scale);
  };
  cpu::parallel_for_each(units_per_tile * shape.num_q_tiles, make_tiles, [&](Tiles& tiles, int64_t order) {
    cpu::RowState& st = tiles.rows();
    const int64_t span = tiles.span_keys();
    std::vector<int64_t> key_pos(span);
    const int64_t tile = shape.num_q_tiles - 1 - order / units_per_tile;
    const int64_t h = order % shape.units;
    const int64_t b = (order / shape.units) % shape.batch;
    const int64_t unit = (b * shape.units + h) * shape.num_q_tiles + tile;  // tile_counts' index
    const int64_t first_head = h * shape.unit_heads;
    const int64_t kv_head = first_head / shape.group;
    const int64_t list_head = shape.order_per_kv_head ? kv_head : first_head;
    const int64_t row_begin = tile * bm;
    const int64_t row_end = std::min(row_begin + bm, layout.num_queries);
    const int64_t segment = row_begin / layout.segment_size;
    const float threshold = unit_threshold ? unit_threshold[b * shape.units + h] : shape.threshold;
    if (threshold < 0.0f) {  // a skipped unit: nothing computed, nothing written
      counts[unit] = 0;
      return;
    }

    // Unit row r is query row row_begin + r % bm of head first_head + r / bm (-1: past the end
    // of the queries).
    int64_t last_pos = -1;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t head = first_head + r / bm, slot = row_begin + r % bm;
      const int64_t i = slot < row_end ? slot : -1;
      st.pos[r] = i >= 0 ? i + layout.q_offset : -1;
      last_pos = std::max(last_pos, st.pos[r]);
      tiles.load_query(r, i >= 0 ? q.row(b, head, i) : nullptr, q.s3);
    }

    int64_t computed = 0;
    if (layout.is_causal) {  // Pass 1: local keys, dense, causal mask on original positions
      const int64_t local_end = std::min(last_pos + 1, layout.num_keys);
      const auto every_tile = [](float) { return true; };
      for (int64_t k0 = layout.segment_start(segment); k0 < local_end; k0 += span) {
        const int64_t n = std::min(span, local_end - k0);
        for (int64_t j = 0; j < n; ++j) key_pos[j] = k0 + j;
        computed += tiles.fold_span(k, v, b, kv_head, key_pos.data(), n, /*causal_mask=*/true, every_tile);
      }
    }
    // Pass 2: the ranked history, early-stopped.
    const int64_t history = layout.history_length(segment);
    const int32_t* ranked =
        idx + (b * shape.ordering_heads + list_head) * total + layout.history_offset(segment);
    const int64_t history_tiles = ceil_div(history, bn);
    int64_t history_tile = 0, quiet_tiles = 0;
    bool stopped = false;
    const auto keep_going = [&](float max_ratio) {
      const float bar = tile_stop_threshold(threshold, shape.tail_threshold, history_tiles - ++history_tile);
      quiet_tiles = max_ratio < bar ? quiet_tiles + 1 : 0;
      stopped = quiet_tiles >= shape.patience;
      return !stopped;
    };
    for (int64_t t0 = 0; t0 < history && !stopped; t0 += span) {
      const int64_t n = std::min(span, history - t0);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t key_index = ranked[t0 + j];
        S2O_CHECK(key_index >= 0 && key_index < history, "indices: entry ", key_index,
                  " is outside its segment's history [0, ", history, ")");
        key_pos[j] = key_index;
      }
      computed += tiles.fold_span(k, v, b, kv_head, key_pos.data(), n, /*causal_mask=*/false, keep_going);
    }

    counts[unit] = static_cast<int32_t>(computed);
    for (int64_t r = 0; r < rows; ++r) {
      if (st.pos[r] < 0) continue;
      const int64_t head = first_head + r / bm, i = row_begin + r % bm;
      const int64_t row = (b * shape.q_heads + head) * layout.num_queries + i;
      const float* acc = st.acc.data() + r * D;
      for (int64_t d = 0; d < D; ++d) o[row * D + d] = static_cast<scalar_t>(acc[d] / st.l[r]);
      lse_out[row] = st.m[r] + std::log(st.l[r]);
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
  if (cpu::matrix_tiles_available(query, call.key, call.value)) {  // fp32 or bf16
    const auto run = [&](auto element) {
      using scalar_t = decltype(element);
      sparse_attention_kernel<cpu::MatrixTiles<scalar_t>, scalar_t>(
          query, call.key, call.value, call.indices, call.unit_threshold, shape, call.out,
          call.lse, call.tile_counts);
    };
    query.scalar_type() == at::kFloat ? run(float{}) : run(at::BFloat16{});
    return;
  }
  S2O_DISPATCH_CPU_FLOAT(query.scalar_type(), "sparse_attention", [&] {
    sparse_attention_kernel<cpu::LoopTiles<scalar_t>, scalar_t>(query, call.key, call.value,
                                                                call.indices, call.unit_threshold,
                                                                shape, call.out, call.lse,
                                                                call.tile_counts);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(s2o, CPU, m) { m.impl("sparse_attention", &sparse_attention_op<sparse_attention_cpu, Kernels::kCpu>); }

}  // namespace s2o
