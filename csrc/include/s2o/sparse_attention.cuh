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
// Per tile t (attention_tile.cuh, shared with the sm_90a kernel: TilePipeline, ThreadRows): wait
// for tile t's K/V and tile t+1's indices, decide whether tile t-1 stopped the unit, issue tile
// t+2's indices and tile t+1's K/V (cp.async, double-buffered; one barrier per tile); then
// S = Q K^T, the online softmax, O += P V and the stop vote on tile t.
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
struct SparseAttentionTraits : AttentionTraits<Element_, kHeadDim_, kRows_> {
  using Base = AttentionTraits<Element_, kHeadDim_, kRows_>;
  using typename Base::Element;
  using Base::kBlockN, Base::kHeadDim, Base::kRows;
  static constexpr int kSubN = 32;              // keys per compute step: 4 mma n-tiles
  static constexpr int kWarps = 4;              // two blocks per SM fit in registers
  static constexpr int kThreads = kWarps * 32;
  // 16-row mma tiles per warp: with 2, each K/V fragment read from shared memory feeds two tiles.
  static constexpr int kMTiles = kRows / (16 * kWarps);
  static constexpr int kTileElements = kBlockN * kHeadDim;
  // Rows of a K/V tile are kHeadDim elements apart (the swizzle permutes chunks within a row).
  using Pipeline = TilePipeline<Element, kHeadDim, kBlockN, kThreads, kHeadDim * sizeof(Element)>;
  static constexpr int kSmemBytes = (kRows * kHeadDim + 4 * kTileElements) * 2 + Pipeline::kSmemBytes;
  static_assert(kHeadDim % 64 == 0, "the swizzle needs at least 8 chunks per row");
  static_assert(kBlockN % kSubN == 0 && kSubN % 16 == 0, "whole compute steps per tile");
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

// acc[m][n] and acc[m][n + 1] += a[m] x the two n8 halves of b (an ldmatrix_x4 B fragment: 16 x 16),
// for every m-tile: one B fragment read from shared memory feeds all of the warp's m-tiles.
template <typename Element, int kMTiles, int kN>
__device__ __forceinline__ void mma_every_m_tile(float (&acc)[kMTiles][kN][4],
                                                 const uint32_t (&a)[kMTiles][4],
                                                 const uint32_t (&b)[4], int n) {
#pragma unroll
  for (int m = 0; m < kMTiles; ++m) {
    mma_16816<Element>(acc[m][n], a[m], b);
    mma_16816<Element>(acc[m][n + 1], a[m], b + 2);
  }
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, 2)
    sparse_attention_kernel(const __grid_constant__ SparseAttentionParams p) {
  using Element = typename Traits::Element;
  constexpr int D = Traits::kHeadDim, kRows = Traits::kRows, kBlockN = Traits::kBlockN;
  constexpr int kMTiles = Traits::kMTiles, kSubN = Traits::kSubN;

  extern __shared__ __align__(128) unsigned char smem[];
  Element* s_q = reinterpret_cast<Element*>(smem);
  Element* s_k = s_q + kRows * D;                    // [2][kBlockN][D]
  Element* s_v = s_k + 2 * Traits::kTileElements;    // [2][kBlockN][D]
  int32_t* s_index = reinterpret_cast<int32_t*>(s_v + 2 * Traits::kTileElements);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const WorkUnit unit(p, kBlockN);
  if (unit.skip(tid)) return;
  const int b = blockIdx.z;
  typename Traits::Pipeline pipeline(
      p, unit, b, tid, smem_address(s_k), smem_address(s_v), s_index,
      [](int row, int chunk) { return uint32_t(swizzle<D>(row, chunk) * sizeof(Element)); });
  pipeline.template start<kRows>(
      p, b, [&](int r, int chunk) { return smem_address(s_q + swizzle<D>(r, chunk)); });

  // This thread's rows: the warp holds kMTiles 16-row tiles.
  const int warp_row = warp * 16 * kMTiles;
  ThreadRows<kMTiles, D> rows(p, unit, warp_row, lane);

  // ldmatrix rows of this lane: Q and V take matrices (rows 0-7, 8-15) x (chunk 0, 1) as
  // lane quads 0-3, K as (chunk 0, 1) x (rows 0-7, 8-15).
  const int quad = lane / 8;
  const FragmentOffsets<D> q_rows(lane % 8 + (quad & 1) * 8, quad >> 1);
  const FragmentOffsets<D> k_rows(lane % 8 + (quad >> 1) * 8, quad & 1);
  const FragmentOffsets<D> v_rows(lane % 8 + (quad & 1) * 8, quad >> 1);
  const uint32_t q_base = smem_address(s_q);

  for (int t = 0; t < unit.n_tiles; ++t) {
    if (!pipeline.begin_tile(t, p.patience, [] {})) break;
    const int stage = t % 2;
    const uint32_t k_base = smem_address(s_k + stage * Traits::kTileElements);
    const uint32_t v_base = smem_address(s_v + stage * Traits::kTileElements);
    rows.begin_tile();

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
          mma_every_m_tile<Element>(s, qa, kb, 2 * jn);
        }
      }

      // The halves carry the online softmax over; the tile's mass adds up in the running frame.
      rows.template softmax<kSubN, kBlockN>(s, unit, t, half * kSubN, p.scale_log2);

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
          mma_every_m_tile<Element>(rows.o, a, vb, 2 * dd);
        }
      }
    }
    pipeline.end_tile(t, rows, p.tail_threshold);
  }
  pipeline.finish();
  rows.template store<Element>(p, unit, b);
}

}  // namespace s2o
