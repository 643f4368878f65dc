// The early-stopping sparse attention kernel (sm_80+, mma.sync m16n8k16). Torch-free.
//
// One thread block computes one work unit: block_m query rows of one segment for one query head,
// or for all G heads of a KV group (group_units: they share every K/V tile the block loads and
// stop together), padded to kRows = 64 or 128 rows, 4 warps of 16 or 32 rows. A unit reads the
// ranked list of its KV head (order_per_kv_head) or of its query head. It visits key tiles of kBlockN keys:
//   tiles [0, n_local):         the local keys from the segment start, dense, causal mask;
//   tiles [n_local, n_tiles):   the ranked history, rows gathered through the index list.
// After each history tile the block stops once no row got at least `threshold` of its softmax
// mass from the tile, `patience` tiles in a row (see csrc/cpu/sparse_attention_cpu.cpp, the
// specification this kernel is tested against).
//
// Pipeline per tile t (one barrier per tile): wait for tile t's K/V and tile t+1's indices; decide
// whether tile t-1 stopped the unit; issue tile t+2's indices and tile t+1's K/V (cp.async,
// 16-byte rows chunks, double-buffered); compute S = Q K^T, the online softmax, the stop flags and
// O += P V on tile t.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "s2o/attention_tile.cuh"
#include "s2o/common.cuh"
#include "s2o/layout.h"
#include "s2o/params.h"

namespace s2o {

template <typename Element_, int kHeadDim_, int kRows_>
struct SparseAttentionTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kRows = kRows_;          // query rows per block (unit rows, padded)
  static constexpr int kBlockN = kCudaBlockN;   // keys per tile (the op's block_n)
  static constexpr int kSubN = 32;              // keys per compute step: 4 mma n-tiles
  static constexpr int kWarps = 4;              // two blocks per SM fit in registers
  static constexpr int kThreads = kWarps * 32;
  // 16-row mma tiles per warp: with 2, each K/V fragment read from shared memory feeds two tiles.
  static constexpr int kMTiles = kRows / (16 * kWarps);
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  static constexpr int kIndexStages = 3;        // index tiles in flight: t+1 in use, t+2 loading
  static constexpr int kTileElements = kBlockN * kHeadDim;
  static constexpr int kSmemBytes = (kRows * kHeadDim + 4 * kTileElements) * 2 +
                                    kIndexStages * kBlockN * 4 + 2 * kWarps * 4;
  static_assert(kHeadDim % 64 == 0, "the swizzle needs at least 8 chunks per row");
  static_assert(kRows == 64 || kRows == 128, "64 or 128 rows per block");
  static_assert(kBlockN % kSubN == 0 && kSubN % 16 == 0, "whole compute steps per tile");
  static_assert(kRows <= kCudaMaxUnitRows, "a block holds one work unit");
};

// Element offset of 16-byte chunk `chunk` of row `row` in a [rows][kHeadDim] shared tile. The
// XOR swizzle spreads the 8 rows an ldmatrix reads at one column over distinct banks.
template <int kHeadDim>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  return row * kHeadDim + ((chunk ^ (row & 7)) << 3);
}

// Byte offsets of the 16-byte rows one thread hands to ldmatrix in a swizzled [rows][kHeadDim]
// tile. The thread reads row (row_base + lane_row) at chunk 2 i + chunk_bit for i = 0..kHeadDim/16;
// with row_base a multiple of 8 the swizzle depends only on lane_row, so four per-thread offsets
// (by i % 4) plus compile-time immediates give every address (the same swizzle as `swizzle`).
template <int kHeadDim>
struct FragmentOffsets {
  uint32_t lane_offset[4];

  __device__ __forceinline__ FragmentOffsets(int lane_row, int chunk_bit) {
    const int r7 = lane_row & 7, high = r7 >> 1, low = chunk_bit ^ (r7 & 1);
#pragma unroll
    for (int j = 0; j < 4; ++j) lane_offset[j] = lane_row * kHeadDim * 2 + 32 * (j ^ high) + 16 * low;
  }
  __device__ __forceinline__ uint32_t operator()(int row_base, int i) const {
    return row_base * kHeadDim * 2 + 128 * (i >> 2) + lane_offset[i & 3];
  }
};

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, 2)
    sparse_attention_kernel(const __grid_constant__ SparseAttentionParams p) {
  using Element = typename Traits::Element;
  constexpr int D = Traits::kHeadDim, kRows = Traits::kRows, kBlockN = Traits::kBlockN;
  constexpr int kThreads = Traits::kThreads, kChunks = Traits::kChunks, kWarps = Traits::kWarps;
  constexpr int kMTiles = Traits::kMTiles, kSubN = Traits::kSubN;

  extern __shared__ __align__(128) unsigned char smem[];
  Element* s_q = reinterpret_cast<Element*>(smem);
  Element* s_k = s_q + kRows * D;                    // [2][kBlockN][D]
  Element* s_v = s_k + 2 * Traits::kTileElements;    // [2][kBlockN][D]
  int32_t* s_index = reinterpret_cast<int32_t*>(s_v + 2 * Traits::kTileElements);  // [3][kBlockN]
  int* s_loud = s_index + Traits::kIndexStages * kBlockN;  // [2][kWarps]: a row was not quiet

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const SegmentLayout& layout = p.layout;
  const WorkUnit unit(p, kBlockN);
  if (unit.skipped()) {  // uniform over the block: before any barrier
    if (tid == 0) *unit.tile_count = 0;
    return;
  }
  const int b = blockIdx.z;
  const int n_local = unit.n_local, n_tiles = unit.n_tiles;

  // Index tile u (a history tile) -> s_index[u % 3]; K and V of tile u -> stage u % 2.
  auto index_tile = [&](int u) { return s_index + (u % Traits::kIndexStages) * kBlockN; };
  auto issue_indices = [&](int u) { unit.issue_index_tile(u, tid, index_tile(u), kBlockN); };
  const KvGather<Element, D, kBlockN, kThreads, D * sizeof(Element)> gather(
      p, unit, b, tid, smem_address(s_k), smem_address(s_v),
      [](int row, int chunk) { return uint32_t(swizzle<D>(row, chunk) * sizeof(Element)); });
  auto issue_kv = [&](int u) { gather.issue(unit, u, index_tile(u)); };

  // Query rows and the first index tiles.
  unit.issue_query_rows<Element, kRows, kChunks, kThreads>(
      p, b, tid, [&](int r, int chunk) { return smem_address(s_q + swizzle<D>(r, chunk)); });
  issue_indices(0);
  issue_indices(1);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  issue_kv(0);
  cp_async_commit();

  // This thread's rows: in each of the warp's m-tiles, rows lane / 4 and lane / 4 + 8. A row's
  // position relative to the segment start decides the causal mask of the local tiles.
  const int warp_row = warp * 16 * kMTiles;
  const int quad_col = 2 * (lane % 4);
  const int tile_row_offset = int(unit.row_begin - unit.segment * layout.segment_size);
  int row_offset[kMTiles][2];
  uint32_t valid_rows = 0;  // bit 2 * m + x
#pragma unroll
  for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      const int r = warp_row + m * 16 + lane / 4 + 8 * x;
      row_offset[m][x] = tile_row_offset + r % p.block_m;
      if (unit.row_valid(r, p.block_m)) valid_rows |= 1u << (2 * m + x);
    }
  }

  // ldmatrix rows of this lane: Q and V take matrices (rows 0-7, 8-15) x (chunk 0, 1) as
  // lane quads 0-3, K as (chunk 0, 1) x (rows 0-7, 8-15).
  const int quad = lane / 8;
  const FragmentOffsets<D> q_rows(lane % 8 + (quad & 1) * 8, quad >> 1);
  const FragmentOffsets<D> k_rows(lane % 8 + (quad >> 1) * 8, quad & 1);
  const FragmentOffsets<D> v_rows(lane % 8 + (quad & 1) * 8, quad >> 1);
  const uint32_t q_base = smem_address(s_q);

  float o[kMTiles][D / 8][4];
#pragma unroll
  for (int m = 0; m < kMTiles; ++m)
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) o[m][dn][0] = o[m][dn][1] = o[m][dn][2] = o[m][dn][3] = 0.0f;
  float row_max[kMTiles][2], row_mass[kMTiles][2];
#pragma unroll
  for (int m = 0; m < kMTiles; ++m) {
    row_max[m][0] = row_max[m][1] = -INFINITY;
    row_mass[m][0] = row_mass[m][1] = 0.0f;
  }
  const bool early_stop = unit.threshold > 0.0f;
  const bool positive_scale = p.scale_log2 > 0.0f;
  StopVote<kWarps> vote(s_loud);
  int tiles_done = 0;

  for (int t = 0; t < n_tiles; ++t) {
    cp_async_wait<0>();
    __syncthreads();
    // Tile t-1 was a history tile: did it stop the unit?
    if (early_stop && t > n_local && vote.stops(t, p.patience)) break;
    issue_indices(t + 2);
    issue_kv(t + 1);
    cp_async_commit();

    const int stage = t % 2;
    const uint32_t k_base = smem_address(s_k + stage * Traits::kTileElements);
    const uint32_t v_base = smem_address(s_v + stage * Traits::kTileElements);

    // The tile in halves of kSubN keys (half the score registers); the online softmax carries
    // over, and the tile's mass is accumulated in the running frame.
    const bool local = unit.is_local(t);
    const int valid_keys = unit.tile_keys(t, kBlockN);
    const bool needs_mask = local || valid_keys < kBlockN;
    float tile_gain[kMTiles][2];
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) tile_gain[m][0] = tile_gain[m][1] = 0.0f;

#pragma unroll 1  // a real loop: unrolled, the halves' live ranges overlap and spill
    for (int half = 0; half < kBlockN / kSubN; ++half) {
      // S = Q K^T for this warp's rows x kSubN keys; each K fragment serves all m-tiles.
      float s[kMTiles][kSubN / 8][4];
#pragma unroll
      for (int m = 0; m < kMTiles; ++m)
#pragma unroll
        for (int jn = 0; jn < kSubN / 8; ++jn) s[m][jn][0] = s[m][jn][1] = s[m][jn][2] = s[m][jn][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t qa[kMTiles][4];
#pragma unroll
        for (int m = 0; m < kMTiles; ++m) ldmatrix_x4(qa[m], q_base + q_rows(warp_row + m * 16, kk));
#pragma unroll
        for (int jn = 0; jn < kSubN / 16; ++jn) {
          uint32_t kb[4];
          ldmatrix_x4(kb, k_base + k_rows(half * kSubN + jn * 16, kk));
#pragma unroll
          for (int m = 0; m < kMTiles; ++m) {
            mma_16816<Element>(s[m][2 * jn], qa[m], kb);
            mma_16816<Element>(s[m][2 * jn + 1], qa[m], kb + 2);
          }
        }
      }

      // Full history tiles, the common case, keep raw scores and fold the scale into the
      // exponent's fma below. Tiles that need a mask (keys past the tile's end; on local tiles,
      // keys after the row's position) are scaled first and masked to -inf, as are all tiles
      // when the scale is not positive (the max of raw scores would not be the max of scaled).
      const bool prescale = needs_mask || !positive_scale;
      const float score_scale = prescale ? 1.0f : p.scale_log2;
      if (prescale) {
#pragma unroll
        for (int m = 0; m < kMTiles; ++m) {
          int last_key[2];  // of this half's columns; later ones are masked
#pragma unroll
          for (int x = 0; x < 2; ++x) {
            const int own = local ? row_offset[m][x] - t * kBlockN : kBlockN;
            last_key[x] = min(own, valid_keys - 1) - half * kSubN;
          }
          mask_scores<kSubN>(s[m], last_key, quad_col, p.scale_log2);
        }
      }

      // Online softmax; the tile's mass is accumulated in the running frame.
      float alpha[kMTiles][2];
      bool max_moved = false;
#pragma unroll
      for (int m = 0; m < kMTiles; ++m) {
        max_moved |= online_softmax<kSubN>(s[m], row_max[m], row_mass[m], tile_gain[m], alpha[m],
                                           score_scale);
      }
      // Visited in falling importance, later tiles rarely raise a row's max: then alpha is
      // exactly 1 for all of the warp's rows and the output needs no rescaling.
      if (__any_sync(0xffffffff, max_moved)) {
#pragma unroll
        for (int m = 0; m < kMTiles; ++m)
#pragma unroll
          for (int dn = 0; dn < D / 8; ++dn)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[m][dn][e] *= alpha[m][e / 2];
      }

      // O += P V, P from the score registers (the m16n8 accumulator layout is the A layout);
      // each V fragment serves all m-tiles.
#pragma unroll
      for (int kk = 0; kk < kSubN / 16; ++kk) {
        uint32_t a[kMTiles][4];
#pragma unroll
        for (int m = 0; m < kMTiles; ++m) pack_probabilities<Element, kSubN>(a[m], s[m], kk);
#pragma unroll
        for (int dd = 0; dd < D / 16; ++dd) {
          uint32_t vb[4];
          ldmatrix_x4_trans(vb, v_base + v_rows(half * kSubN + kk * 16, dd));
#pragma unroll
          for (int m = 0; m < kMTiles; ++m) {
            mma_16816<Element>(o[m][2 * dd], a[m], vb);
            mma_16816<Element>(o[m][2 * dd + 1], a[m], vb + 2);
          }
        }
      }
    }

    // The stop test on the whole tile: did any row get at least the bar's share of its mass from it?
    if (early_stop && !local) {
      const float bar = unit.stop_threshold(t, p.tail_threshold);
      bool loud = false;
#pragma unroll
      for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
        for (int x = 0; x < 2; ++x) {
          loud |= ((valid_rows >> (2 * m + x)) & 1u) &&
                  row_is_loud(tile_gain[m][x], row_mass[m][x], bar);
        }
      }
      vote.cast(t, warp, lane, loud);
    }
    tiles_done = t + 1;
  }
  cp_async_wait<0>();

  if (tid == 0) {
    *unit.tile_count = tiles_done;
  }
  Element* out = static_cast<Element*>(p.out);
#pragma unroll
  for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      if (!((valid_rows >> (2 * m + x)) & 1u)) continue;
      const int r = warp_row + m * 16 + lane / 4 + 8 * x;
      const int64_t row = unit.out_row(p, b, r);
      store_row<Element, D>(out + row * D, p.lse + row, o[m], x, row_max[m][x], row_mass[m][x],
                            lane);
    }
  }
}

}  // namespace s2o
