// Pieces shared by the sparse attention kernels (sparse_attention.cuh for sm_80+ with mma.sync,
// sparse_attention_sm90.cuh for sm_90a with wgmma): the work unit of a thread block, and the
// per-thread online softmax on score fragments in the m16n8 accumulator layout (mma.sync's C, and
// each warp's 16 rows of a wgmma m64 accumulator). Torch-free.
//
// Fragment layout: a thread holds rows lane / 4 (x = 0) and lane / 4 + 8 (x = 1) of a 16-row
// tile; s[j][2 x + e] is the score of column 8 j + 2 (lane % 4) + e.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "s2o/common.cuh"
#include "s2o/layout.h"
#include "s2o/params.h"
#include "s2o/stop_rule.h"

namespace s2o {

__device__ __forceinline__ float fast_exp2(float x) {  // 2^x; exact 0 for -inf
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// What both kernels' traits share: one thread block computes one work unit of kRows rows.
template <typename Element_, int kHeadDim_, int kRows_>
struct AttentionTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kRows = kRows_;         // query rows per block (unit rows, padded)
  static constexpr int kBlockN = kCudaBlockN;  // keys per tile (the op's block_n)
  static_assert(kRows == 64 || kRows == 128, "64 or 128 rows per block");
  static_assert(kRows <= kCudaMaxUnitRows, "a block holds one work unit");
};

// One thread block's work: block_m query rows of one segment for one query head, or for all G
// heads of a KV group (group_units), and the key tiles it may visit:
//   tiles [0, n_local):        the local keys from the segment start, dense, causal mask;
//   tiles [n_local, n_tiles):  the ranked history, rows gathered through the index list.
struct WorkUnit {
  int q_tile, first_head, kv_head, list_head, unit_rows, n_local, n_tiles;
  float threshold;  // the stop threshold: p.threshold or the unit head's p.unit_threshold entry
  int32_t* tile_count;  // this unit's entry of p.tile_counts
  int64_t row_begin, row_end, segment, local_begin, local_end, history;
  const int32_t* ranked;  // [history]: the segment's history keys, ranked

  __device__ __forceinline__ WorkUnit(const SparseAttentionParams& p, int block_n) {
    const SegmentLayout& layout = p.layout;
    q_tile = p.num_q_tiles - 1 - int(blockIdx.x);  // longest histories first
    const int b = blockIdx.z;
    first_head = int(blockIdx.y) * p.unit_heads;
    kv_head = first_head / p.group;
    list_head = p.order_per_kv_head ? kv_head : first_head;
    row_begin = int64_t(q_tile) * p.block_m;
    row_end = min(row_begin + p.block_m, layout.num_queries);
    unit_rows = p.unit_heads * p.block_m;
    segment = row_begin / layout.segment_size;
    local_begin = layout.segment_start(segment);
    local_end = min(row_end + layout.q_offset, layout.num_keys);
    n_local = layout.is_causal && local_end > local_begin
                  ? int(ceil_div(local_end - local_begin, block_n))
                  : 0;
    history = layout.history_length(segment);
    n_tiles = n_local + int(ceil_div(history, block_n));
    ranked = p.indices + (int64_t(b) * p.ordering_heads + list_head) * layout.total_history() +
             layout.history_offset(segment);
    const int64_t unit_head = int64_t(b) * p.units + blockIdx.y;
    threshold = p.unit_threshold ? p.unit_threshold[unit_head] : p.threshold;
    tile_count = p.tile_counts + unit_head * p.num_q_tiles + q_tile;
  }

  // A negative threshold skips the unit: nothing computed, nothing written but its tile count
  // (0, by thread 0). Uniform over the block, so a kernel returns on it before any barrier.
  __device__ __forceinline__ bool skip(int tid) const {
    if (threshold >= 0.0f) return false;
    if (tid == 0) *tile_count = 0;
    return true;
  }

  __device__ __forceinline__ bool is_local(int t) const { return t < n_local; }
  // The bar history tile t must reach to keep the unit going (tiles after it: n_tiles - t - 1).
  __device__ __forceinline__ float stop_threshold(int t, float tail_threshold) const {
    return tile_stop_threshold(threshold, tail_threshold, n_tiles - t - 1);
  }
  // Tile t's first key position (local tiles) or first ranked slot (history tiles).
  __device__ __forceinline__ int64_t tile_begin(int t, int block_n) const {
    return is_local(t) ? local_begin + int64_t(t) * block_n : int64_t(t - n_local) * block_n;
  }
  // Keys in tile t (block_n except in the last local and the last history tile).
  __device__ __forceinline__ int tile_keys(int t, int block_n) const {
    return int(min(int64_t(block_n), (is_local(t) ? local_end : history) - tile_begin(t, block_n)));
  }
  // Whether block row r (head r / block_m, query row row_begin + r % block_m) is a real row.
  __device__ __forceinline__ bool row_valid(int r, int block_m) const {
    return r < unit_rows && row_begin + r % block_m < row_end;
  }
  // Block row r's row in the [B, Hq, Nq] layout of out and lse (batch entry b).
  __device__ __forceinline__ int64_t out_row(const SparseAttentionParams& p, int b, int r) const {
    const int head = first_head + r / p.block_m;
    return (int64_t(b) * p.q_heads + head) * p.layout.num_queries + row_begin + r % p.block_m;
  }

  // Thread tid (< block_n) copies its entry of history tile u's indices to slots[tid]
  // (cp.async, zero past the history's end); nothing for local tiles and tiles past the end.
  __device__ __forceinline__ void issue_index_tile(int u, int tid, int32_t* slots,
                                                   int block_n) const {
    if (u < n_local || u >= n_tiles || tid >= block_n) return;
    const int64_t slot = int64_t(u - n_local) * block_n + tid;
    const bool valid = slot < history;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_address(slots + tid)),
                 "l"(valid ? ranked + slot : ranked), "r"(valid ? 4 : 0));
  }

  // The unit's query rows (batch entry b) into shared memory with cp.async, in 16-byte chunks
  // (padding rows zero); dst(r, chunk) is the shared address of chunk `chunk` of block row r.
  template <typename Element, int kRows, int kChunks, int kThreads, typename Dst>
  __device__ __forceinline__ void issue_query_rows(const SparseAttentionParams& p, int b, int tid,
                                                   Dst dst) const {
    const Element* q = static_cast<const Element*>(p.query) + b * p.q_strides.batch;
#pragma unroll
    for (int c = tid; c < kRows * kChunks; c += kThreads) {
      const int r = c / kChunks, chunk = c % kChunks;
      const int64_t i = row_begin + r % p.block_m;
      const bool valid = r < unit_rows && i < row_end;
      const Element* src =
          valid ? q + (first_head + r / p.block_m) * p.q_strides.head + i * p.q_strides.row +
                      chunk * 8
                : q;
      cp_async_16(dst(r, chunk), src, valid ? 16 : 0);
    }
  }
};

// The K/V gather of a unit: tile u's key rows into shared stage u % 2 (cp.async, 16-byte chunks;
// rows past the tile's end are zero-filled; an index outside the keys reads key 0, for memory
// safety), local tiles by position and history tiles through their index tile. Each thread copies
// one chunk column of rows row0 + i * kRowStep, so its shared offsets (the kernel's swizzle
// depends on row % 8 only) and its global column are fixed: per row only the key's address
// changes. tile_offset(row, chunk) is the kernel's byte offset of a chunk in a tile, and rows
// kRowPitch bytes apart at a fixed chunk (compile-time, so every row's offset is an immediate).
template <typename Element, int kHeadDim, int kBlockN, int kThreads, int kRowPitch>
struct KvGather {
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  static constexpr int kRowStep = kThreads / kChunks;
  static constexpr uint32_t kTileBytes = uint32_t(kBlockN * kHeadDim * sizeof(Element));
  static_assert(kThreads % kChunks == 0 && kRowStep % 8 == 0 && kBlockN % kRowStep == 0,
                "whole rows per pass, one swizzle phase per thread");

  const Element* k_col;
  const Element* v_col;
  int64_t k_row_stride, v_row_stride;
  uint32_t k_dst, v_dst, num_keys;
  int row0;

  template <typename TileOffset>
  __device__ __forceinline__ KvGather(const SparseAttentionParams& p, const WorkUnit& unit, int b,
                                      int tid, uint32_t s_k, uint32_t s_v,
                                      TileOffset tile_offset) {
    row0 = tid / kChunks;
    const int chunk = tid % kChunks;
    k_col = static_cast<const Element*>(p.key) + b * p.k_strides.batch +
            unit.kv_head * p.k_strides.head + chunk * 8;
    v_col = static_cast<const Element*>(p.value) + b * p.v_strides.batch +
            unit.kv_head * p.v_strides.head + chunk * 8;
    k_row_stride = p.k_strides.row;
    v_row_stride = p.v_strides.row;
    const uint32_t offset = tile_offset(row0, chunk);
    k_dst = s_k + offset;
    v_dst = s_v + offset;
    num_keys = uint32_t(p.layout.num_keys);
  }

  // tile_index: tile u's entries of the ranked list in shared memory (history tiles).
  __device__ __forceinline__ void issue(const WorkUnit& unit, int u,
                                        const int32_t* tile_index) const {
    if (u >= unit.n_tiles) return;
    const uint32_t stage_bytes = uint32_t(u % 2) * kTileBytes;
    const bool local = unit.is_local(u);
    const int64_t tile_begin = unit.tile_begin(u, kBlockN);
    const int tile_rows = unit.tile_keys(u, kBlockN);
#pragma unroll
    for (int i = 0; i < kBlockN / kRowStep; ++i) {
      const int j = row0 + i * kRowStep;
      const bool valid = j < tile_rows;
      uint32_t key = local ? uint32_t(tile_begin + j) : uint32_t(tile_index[j]);
      key = valid && key < num_keys ? key : 0u;
      const uint32_t dst = uint32_t(i * kRowStep * kRowPitch) + stage_bytes;
      cp_async_16(k_dst + dst, k_col + int64_t(key) * k_row_stride, valid ? 16 : 0);
      cp_async_16(v_dst + dst, v_col + int64_t(key) * v_row_stride, valid ? 16 : 0);
    }
  }
};

// The stop rule across a block's warps: after history tile t each warp votes whether any of its
// rows reached the bar (cast); after the barrier that precedes tile t + 1, every thread reads the
// votes on tile t and counts the quiet tiles in a row (stops). Votes alternate between two slots,
// so one barrier per tile separates each write from its reads.
template <int kWarps>
struct StopVote {
  int* votes;  // [2][kWarps] in shared memory
  int quiet_tiles = 0;

  __device__ __forceinline__ explicit StopVote(int* shared_votes) : votes(shared_votes) {}

  __device__ __forceinline__ void cast(int t, int warp, int lane, bool loud) {
    loud = __any_sync(0xffffffff, loud);
    if (lane == 0) votes[(t % 2) * kWarps + warp] = loud;
  }

  // Whether tile t - 1 (voted on) ends the unit: `patience` quiet history tiles in a row.
  __device__ __forceinline__ bool stops(int t, int patience) {
    const int* tile_votes = votes + ((t - 1) % 2) * kWarps;
    bool loud = false;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) loud |= tile_votes[w] != 0;
    quiet_tiles = loud ? 0 : quiet_tiles + 1;
    return quiet_tiles >= patience;
  }
};

// The loads and the stop vote of a unit's tile loop, the same in both kernels. Index tile u (a
// history tile) goes to index stage u % kIndexStages, K and V of tile u to stage u % 2 (KvGather).
// Per tile t: begin_tile waits for tile t's K/V and tile t+1's indices, decides whether tile t-1
// stopped the unit, and issues tile t+2's indices and tile t+1's K/V (one barrier per tile);
// end_tile casts the tile's stop vote. kRowPitch: as KvGather's.
template <typename Element, int kHeadDim, int kBlockN, int kThreads, int kRowPitch>
struct TilePipeline {
  static constexpr int kIndexStages = 3;  // index tiles in flight: t+1 in use, t+2 loading
  static constexpr int kWarps = kThreads / 32;
  // Shared memory beyond Q and the K/V stages: the index stages, then the votes.
  static constexpr int kSmemBytes = kIndexStages * kBlockN * 4 + 2 * kWarps * 4;
  using Gather = KvGather<Element, kHeadDim, kBlockN, kThreads, kRowPitch>;

  const WorkUnit& unit;
  int32_t* s_index;  // [kIndexStages][kBlockN], followed by the votes
  Gather gather;
  StopVote<kWarps> vote;
  int tid, tiles_done = 0;
  bool early_stop;

  // s_k, s_v: shared addresses of K and V stage 0; tile_offset: as KvGather's.
  template <typename TileOffset>
  __device__ __forceinline__ TilePipeline(const SparseAttentionParams& p, const WorkUnit& unit,
                                          int b, int tid, uint32_t s_k, uint32_t s_v,
                                          int32_t* s_index, TileOffset tile_offset)
      : unit(unit),
        s_index(s_index),
        gather(p, unit, b, tid, s_k, s_v, tile_offset),
        vote(reinterpret_cast<int*>(s_index + kIndexStages * kBlockN)),
        tid(tid),
        early_stop(unit.threshold > 0.0f) {}

  __device__ __forceinline__ int32_t* index_tile(int u) const {
    return s_index + (u % kIndexStages) * kBlockN;
  }
  __device__ __forceinline__ void issue_indices(int u) const {
    unit.issue_index_tile(u, tid, index_tile(u), kBlockN);
  }
  __device__ __forceinline__ void issue_kv(int u) const { gather.issue(unit, u, index_tile(u)); }

  // The unit's query rows (q_dst: as WorkUnit::issue_query_rows'), the first two index tiles,
  // then tile 0's K/V.
  template <int kRows, typename QDst>
  __device__ __forceinline__ void start(const SparseAttentionParams& p, int b, QDst q_dst) const {
    unit.issue_query_rows<Element, kRows, kHeadDim / 8, kThreads>(p, b, tid, q_dst);
    issue_indices(0);
    issue_indices(1);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    issue_kv(0);
    cp_async_commit();
  }

  // Returns false when tile t - 1 ended the unit. fence: run between the wait and the barrier
  // (the wgmma kernel orders the gathered tile before its async-proxy reads).
  template <typename Fence>
  __device__ __forceinline__ bool begin_tile(int t, int patience, Fence fence) {
    cp_async_wait<0>();
    fence();
    __syncthreads();
    if (early_stop && t > unit.n_local && vote.stops(t, patience)) return false;
    issue_indices(t + 2);
    issue_kv(t + 1);
    cp_async_commit();
    return true;
  }

  // After tile t's products: its stop vote (history tiles), from the thread's rows.
  template <typename Rows>
  __device__ __forceinline__ void end_tile(int t, const Rows& rows, float tail_threshold) {
    if (early_stop && !unit.is_local(t)) {
      vote.cast(t, tid / 32, tid % 32, rows.loud(unit.stop_threshold(t, tail_threshold)));
    }
    tiles_done = t + 1;
  }

  // After the loop: no copy left in flight; the unit's tile count.
  __device__ __forceinline__ void finish() const {
    cp_async_wait<0>();
    if (tid == 0) *unit.tile_count = tiles_done;
  }
};

// Scales the scores of one 16-row fragment to the log2 domain and masks, per row x, the columns
// after last_key[x] to -inf.
template <int kCols>
__device__ __forceinline__ void mask_scores(float (&s)[kCols / 8][4], const int (&last_key)[2],
                                            int quad_col, float scale_log2) {
#pragma unroll
  for (int x = 0; x < 2; ++x) {
#pragma unroll
    for (int j = 0; j < kCols / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& value = s[j][2 * x + e];
        value = j * 8 + quad_col + e > last_key[x] ? -INFINITY : value * scale_log2;
      }
    }
  }
}

// Online softmax step of one 16-row fragment in the log2 domain: the new row max, probabilities
// 2^(s * score_scale - max) in place of the scores (one fma each), the row mass and the tile's
// gain in the running frame. alpha[x] rescales the earlier mass and output to the new max.
// Returns whether a row's max moved (else alpha is exactly 1).
template <int kCols>
__device__ __forceinline__ bool online_softmax(float (&s)[kCols / 8][4], float (&row_max)[2],
                                               float (&row_mass)[2], float (&tile_gain)[2],
                                               float (&alpha)[2], float score_scale) {
  bool max_moved = false;
#pragma unroll
  for (int x = 0; x < 2; ++x) {
    float sub_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < kCols / 8; ++j) sub_max = fmaxf(sub_max, fmaxf(s[j][2 * x], s[j][2 * x + 1]));
    sub_max = fmaxf(sub_max, __shfl_xor_sync(0xffffffff, sub_max, 1));
    sub_max = fmaxf(sub_max, __shfl_xor_sync(0xffffffff, sub_max, 2));
    const float new_max = fmaxf(row_max[x], sub_max * score_scale);
    const float frame = new_max == -INFINITY ? 0.0f : new_max;  // all masked so far
    alpha[x] = fast_exp2(row_max[x] - frame);
    max_moved |= row_max[x] != new_max;
    float gain = 0.0f;
#pragma unroll
    for (int j = 0; j < kCols / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& value = s[j][2 * x + e];
        value = fast_exp2(fmaf(value, score_scale, -frame));
        gain += value;
      }
    }
    gain += __shfl_xor_sync(0xffffffff, gain, 1);
    gain += __shfl_xor_sync(0xffffffff, gain, 2);
    row_max[x] = new_max;
    row_mass[x] = row_mass[x] * alpha[x] + gain;
    tile_gain[x] = tile_gain[x] * alpha[x] + gain;
  }
  return max_moved;
}

// Probabilities of columns [16 kk, 16 kk + 16) as the A fragment of an m16n8k16 step (the
// accumulator layout of two n8 blocks is the A layout of one k16 step).
template <typename Element, int kCols>
__device__ __forceinline__ void pack_probabilities(uint32_t (&a)[4], const float (&s)[kCols / 8][4],
                                                   int kk) {
  a[0] = pack2<Element>(s[2 * kk][0], s[2 * kk][1]);
  a[1] = pack2<Element>(s[2 * kk][2], s[2 * kk][3]);
  a[2] = pack2<Element>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
  a[3] = pack2<Element>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

// Whether a row got at least `threshold` of its mass from the tile: gain / mass >= threshold, as a
// product (a division costs ~20 instructions here; the two differ only at near-ties, which the
// tests exclude). NaN gains count as quiet, as in the CPU kernel's fmax. The mass cannot overflow:
// each probability is at most 1 in the running frame.
__device__ __forceinline__ bool row_is_loud(float tile_gain, float row_mass, float threshold) {
  return row_mass > 0.0f && tile_gain >= threshold * row_mass;
}

// The query rows one thread holds in the m16n8 fragment layout and their online softmax state:
// in each of kMTiles 16-row tiles from block row first_row, rows lane / 4 (x = 0) and
// lane / 4 + 8 (x = 1). Per tile: begin_tile, then softmax on each group of kCols scores.
template <int kMTiles, int kHeadDim>
struct ThreadRows {
  float o[kMTiles][kHeadDim / 8][4];  // unnormalised output, the accumulator layout
  float row_max[kMTiles][2];          // running max, log2 domain
  float row_mass[kMTiles][2];         // softmax mass in the running max's frame
  float tile_gain[kMTiles][2];        // the current tile's mass, same frame
  int offset[kMTiles][2];  // row position relative to the segment start (local causal mask)
  // A real row (not padding). Flags, not a bitmask: the mask's read-modify-writes cost the wgmma
  // kernel registers (spills in its main loop, ~3% slower at threshold 0 on the H200).
  bool valid[kMTiles][2];
  int first_row, lane;

  __device__ __forceinline__ ThreadRows(const SparseAttentionParams& p, const WorkUnit& unit,
                                        int first_row, int lane)
      : first_row(first_row), lane(lane) {
    const int tile_row_offset = int(unit.row_begin - unit.segment * p.layout.segment_size);
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
      for (int x = 0; x < 2; ++x) {
        offset[m][x] = tile_row_offset + row(m, x) % p.block_m;
        valid[m][x] = unit.row_valid(row(m, x), p.block_m);
        row_max[m][x] = -INFINITY;
        row_mass[m][x] = 0.0f;
      }
#pragma unroll
      for (int dn = 0; dn < kHeadDim / 8; ++dn) {
#pragma unroll
        for (int e = 0; e < 4; ++e) o[m][dn][e] = 0.0f;
      }
    }
  }

  // Block row of row x of m-tile m.
  __device__ __forceinline__ int row(int m, int x) const { return first_row + m * 16 + lane / 4 + 8 * x; }

  __device__ __forceinline__ void begin_tile() {
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) tile_gain[m][0] = tile_gain[m][1] = 0.0f;
  }

  // The online softmax over columns [col0, col0 + kCols) of tile t (kBlockN keys), s holding each
  // m-tile's raw scores Q K^T; s holds the probabilities after. Full history tiles, the common
  // case, keep raw scores and fold the scale into the exponent's fma. Tiles that need a mask
  // (keys past the tile's end; on local tiles, keys after the row's position) are scaled first
  // and masked to -inf, as are all tiles when the scale is not positive (the max of raw scores
  // would not be the max of scaled ones).
  template <int kCols, int kBlockN>
  __device__ __forceinline__ void softmax(float (&s)[kMTiles][kCols / 8][4], const WorkUnit& unit,
                                          int t, int col0, float scale_log2) {
    const bool local = unit.is_local(t);
    const int valid_keys = unit.tile_keys(t, kBlockN);
    const bool prescale = local || valid_keys < kBlockN || !(scale_log2 > 0.0f);
    const float score_scale = prescale ? 1.0f : scale_log2;
    if (prescale) {
#pragma unroll
      for (int m = 0; m < kMTiles; ++m) {
        int last_key[2];  // of these columns; later ones are masked
#pragma unroll
        for (int x = 0; x < 2; ++x) {
          const int own = local ? offset[m][x] - t * kBlockN : kBlockN;
          last_key[x] = min(own, valid_keys - 1) - col0;
        }
        mask_scores<kCols>(s[m], last_key, 2 * (lane % 4), scale_log2);
      }
    }
    float alpha[kMTiles][2];
    bool max_moved = false;
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
      max_moved |= online_softmax<kCols>(s[m], row_max[m], row_mass[m], tile_gain[m], alpha[m],
                                         score_scale);
    }
    // Visited in falling importance, later tiles rarely raise a row's max: then alpha is exactly
    // 1 for all of the warp's rows and the output needs no rescaling.
    if (__any_sync(0xffffffff, max_moved)) {
#pragma unroll
      for (int m = 0; m < kMTiles; ++m)
#pragma unroll
        for (int dn = 0; dn < kHeadDim / 8; ++dn)
#pragma unroll
          for (int e = 0; e < 4; ++e) o[m][dn][e] *= alpha[m][e / 2];
    }
  }

  // The stop test on the whole tile: whether a real row got at least `bar` of its mass from it.
  __device__ __forceinline__ bool loud(float bar) const {
    bool any = false;
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
      for (int x = 0; x < 2; ++x) any |= valid[m][x] && row_is_loud(tile_gain[m][x], row_mass[m][x], bar);
    }
    return any;
  }

  // Writes the real rows to out [B, Hq, Nq, D] (out = O / mass) and their log-sum-exp (natural
  // log) to lse, for batch entry b.
  template <typename Element>
  __device__ __forceinline__ void store(const SparseAttentionParams& p, const WorkUnit& unit,
                                        int b) const {
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
      for (int x = 0; x < 2; ++x) {
        if (!valid[m][x]) continue;
        const int64_t out_row = unit.out_row(p, b, row(m, x));
        const float inv_mass = 1.0f / row_mass[m][x];
        Element* dst = static_cast<Element*>(p.out) + out_row * kHeadDim + 2 * (lane % 4);
#pragma unroll
        for (int dn = 0; dn < kHeadDim / 8; ++dn) {
          *reinterpret_cast<uint32_t*>(dst + dn * 8) =
              pack2<Element>(o[m][dn][2 * x] * inv_mass, o[m][dn][2 * x + 1] * inv_mass);
        }
        if (lane % 4 == 0) {
          p.lse[out_row] = (row_max[m][x] + log2f(row_mass[m][x])) * 0.69314718055994531f;
        }
      }
    }
  }
};

}  // namespace s2o
