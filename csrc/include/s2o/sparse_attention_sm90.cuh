// The early-stopping sparse attention kernel for Hopper (sm_90a, wgmma). Torch-free.
//
// Same function as sparse_attention.cuh (the sm_80 kernel; its header explains work units, tiles
// and the stop rule), with the two GEMMs of each tile on warpgroup MMAs: one warpgroup per 64 rows
// of the unit (kRows = 64 or 128), S = Q K^T as wgmma m64n64k16 from shared memory, the online
// softmax on the accumulator registers, and O += P V as wgmma m64nDk16 with P from registers.
// K/V rows are gathered through the index list with cp.async, double-buffered, into the 128-byte
// swizzled layout of wgmma.cuh.
//
// Pipeline per tile t (one barrier per tile): wait for tile t's K/V and tile t+1's indices; decide
// whether tile t-1 stopped the unit; issue tile t+2's indices and tile t+1's K/V; compute tile t.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "s2o/attention_tile.cuh"
#include "s2o/common.cuh"
#include "s2o/layout.h"
#include "s2o/params.h"
#include "s2o/wgmma.cuh"

namespace s2o {

template <typename Element_, int kHeadDim_, int kRows_>
struct Sm90AttentionTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kRows = kRows_;           // query rows per block (unit rows, padded)
  static constexpr int kBlockN = kCudaBlockN;    // keys per tile (the op's block_n)
  static constexpr int kWarpGroups = kRows / 64;  // one wgmma m64 row block each
  static constexpr int kThreads = kWarpGroups * 128;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kChunks = kHeadDim / 8;   // 16-byte chunks per row
  static constexpr int kIndexStages = 3;         // index tiles in flight: t+1 in use, t+2 loading
  static constexpr int kQBytes = kRows * kHeadDim * 2;
  static constexpr int kTileBytes = kBlockN * kHeadDim * 2;
  // Q, then K and V double-buffered: 1024-byte aligned for the swizzle atoms.
  static constexpr int kSmemBytes = 1024 + kQBytes + 4 * kTileBytes + kIndexStages * kBlockN * 4 +
                                    2 * kWarps * 4;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "wgmma N of the P V product");
  static_assert(kRows == 64 || kRows == 128, "64 or 128 rows per block");
  static_assert(kBlockN == 64, "the S = Q K^T product is one m64n64 wgmma per k step");
  static_assert(kRows <= kCudaMaxUnitRows, "a block holds one work unit");
};

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, 2)
    sparse_attention_sm90_kernel(const __grid_constant__ SparseAttentionParams p) {
#if defined(S2O_WGMMA_ENABLED)
  using Element = typename Traits::Element;
  constexpr int D = Traits::kHeadDim, kRows = Traits::kRows, kBlockN = Traits::kBlockN;
  constexpr int kThreads = Traits::kThreads, kChunks = Traits::kChunks, kWarps = Traits::kWarps;

  extern __shared__ unsigned char smem_raw[];
  // Dynamic shared memory is only 16-byte aligned by contract: round up to the swizzle atom.
  unsigned char* smem = smem_raw + ((1024 - smem_address(smem_raw) % 1024) % 1024);
  const uint32_t s_q = smem_address(smem);
  const uint32_t s_k = s_q + Traits::kQBytes;            // [2] tiles
  const uint32_t s_v = s_k + 2 * Traits::kTileBytes;     // [2] tiles
  int32_t* s_index = reinterpret_cast<int32_t*>(smem + Traits::kQBytes + 4 * Traits::kTileBytes);
  int* s_loud = s_index + Traits::kIndexStages * kBlockN;  // [2][kWarps]: a row was not quiet

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const SegmentLayout& layout = p.layout;
  const WorkUnit unit(p, kBlockN);
  if (unit.skipped()) {  // uniform over the block: before any barrier
    if (tid == 0) *unit.tile_count = 0;
    return;
  }
  const int b = blockIdx.z;
  // Index tile u (a history tile) -> s_index[u % 3]; K and V of tile u -> stage u % 2, in the
  // 128-byte swizzled layout of wgmma.cuh.
  auto index_tile = [&](int u) { return s_index + (u % Traits::kIndexStages) * kBlockN; };
  auto issue_indices = [&](int u) { unit.issue_index_tile(u, tid, index_tile(u), kBlockN); };
  using Gather = KvGather<Element, D, kBlockN, kThreads, 128>;  // 128-byte swizzled rows
  static_assert(Gather::kTileBytes == Traits::kTileBytes, "one stage per tile");
  const Gather gather(p, unit, b, tid, s_k, s_v,
                      [](int row, int chunk) { return swizzle128<kBlockN>(row, chunk); });
  auto issue_kv = [&](int u) { gather.issue(unit, u, index_tile(u)); };

  // Query rows and the first index tiles.
  unit.issue_query_rows<Element, kRows, kChunks, kThreads>(
      p, b, tid, [&](int r, int chunk) { return s_q + swizzle128<kRows>(r, chunk); });
  issue_indices(0);
  issue_indices(1);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  issue_kv(0);
  cp_async_commit();

  // This thread's rows: warp w holds rows 16 w + lane / 4 and 16 w + lane / 4 + 8 of the block
  // (warpgroup w / 4 computes rows 64 (w / 4) .. + 64). A row's position relative to the segment
  // start decides the causal mask of the local tiles.
  const int warp_row = warp * 16;
  const int quad_col = 2 * (lane % 4);
  const int tile_row_offset = int(unit.row_begin - unit.segment * layout.segment_size);
  int row_offset[2];
  uint32_t valid_rows = 0;  // bit x
#pragma unroll
  for (int x = 0; x < 2; ++x) {
    const int r = warp_row + lane / 4 + 8 * x;
    row_offset[x] = tile_row_offset + r % p.block_m;
    if (unit.row_valid(r, p.block_m)) valid_rows |= 1u << x;
  }

  // Descriptors of this warpgroup's 64 query rows and of the K and V tiles of stage 0. K steps
  // move the start address: 32 bytes per 16 columns inside a 128-byte column block, then to the
  // next block.
  const Swizzle128Descriptor q_desc(s_q + uint32_t((warp / 4) * 64 * 128), 16, 1024);
  const Swizzle128Descriptor k_desc(s_k, 16, 1024);
  const Swizzle128Descriptor v_desc(s_v, kBlockN * 128, 1024);
  auto qk_offset = [](int step, int tile_rows) {
    return uint32_t((step / 4) * tile_rows * 128 + (step % 4) * 32);
  };

  float o[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_mass[2] = {0.0f, 0.0f};
  const bool early_stop = unit.threshold > 0.0f;
  const bool positive_scale = p.scale_log2 > 0.0f;
  StopVote<kWarps> vote(s_loud);
  int tiles_done = 0;

  for (int t = 0; t < unit.n_tiles; ++t) {
    cp_async_wait<0>();
    fence_proxy_async();  // the gathered tile is read by wgmma (the async proxy)
    __syncthreads();
    // Tile t-1 was a history tile: did it stop the unit?
    if (early_stop && t > unit.n_local && vote.stops(t, p.patience)) break;
    issue_indices(t + 2);
    issue_kv(t + 1);
    cp_async_commit();

    const int stage = t % 2;
    const uint32_t stage_bytes = uint32_t(stage * Traits::kTileBytes);

    // S = Q K^T for the warpgroup's 64 rows x 64 keys.
    float s[kBlockN / 8][4];
    float(&s_flat)[kBlockN / 2] = reinterpret_cast<float(&)[kBlockN / 2]>(s);
    wgmma_fence();
#pragma unroll
    for (int step = 0; step < D / 16; ++step) {
      wgmma_m64n64k16_ss<Element>(s_flat, q_desc.at(qk_offset(step, kRows)),
                                  k_desc.at(stage_bytes + qk_offset(step, kBlockN)), step > 0);
    }
    wgmma_commit();
    wgmma_wait_all();
    fence_registers(s_flat);

    // Full history tiles keep raw scores and fold the scale into the exponent's fma; tiles that
    // need a mask (keys past the tile's end; on local tiles, keys after the row's position), or
    // a non-positive scale, are scaled first and masked to -inf.
    const bool local = unit.is_local(t);
    const int valid_keys = unit.tile_keys(t, kBlockN);
    const bool prescale = local || valid_keys < kBlockN || !positive_scale;
    const float score_scale = prescale ? 1.0f : p.scale_log2;
    if (prescale) {
      int last_key[2];
#pragma unroll
      for (int x = 0; x < 2; ++x) {
        const int own = local ? row_offset[x] - t * kBlockN : kBlockN;
        last_key[x] = min(own, valid_keys - 1);
      }
      mask_scores<kBlockN>(s, last_key, quad_col, p.scale_log2);
    }
    float tile_gain[2] = {0.0f, 0.0f}, alpha[2];
    const bool max_moved = online_softmax<kBlockN>(s, row_max, row_mass, tile_gain, alpha, score_scale);
    // Visited in falling importance, later tiles rarely raise a row's max: then alpha is exactly
    // 1 for all of the warp's rows and the output needs no rescaling.
    if (__any_sync(0xffffffff, max_moved)) {
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[dn][e] *= alpha[e / 2];
    }

    // O += P V: P from registers, V [keys][D] as the MN-major B operand (16 keys per k step).
    uint32_t a[kBlockN / 16][4];
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) pack_probabilities<Element, kBlockN>(a[kk], s, kk);
    float(&o_flat)[D / 2] = reinterpret_cast<float(&)[D / 2]>(o);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      wgmma_rs<Element, D>(o_flat, a[kk], v_desc.at(stage_bytes + uint32_t(kk * 16 * 128)));
    }
    wgmma_commit();
    wgmma_wait_all();
    fence_registers(o_flat);

    // The stop test on the whole tile: did any row get at least the bar's share of its mass from it?
    if (early_stop && !local) {
      const float bar = unit.stop_threshold(t, p.tail_threshold);
      bool loud = false;
#pragma unroll
      for (int x = 0; x < 2; ++x)
        loud |= ((valid_rows >> x) & 1u) && row_is_loud(tile_gain[x], row_mass[x], bar);
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
  for (int x = 0; x < 2; ++x) {
    if (!((valid_rows >> x) & 1u)) continue;
    const int r = warp_row + lane / 4 + 8 * x;
    const int64_t row = unit.out_row(p, b, r);
    store_row<Element, D>(out + row * D, p.lse + row, o, x, row_max[x], row_mass[x], lane);
  }
#else
  __trap();  // built without sm_90a: the host never launches this kernel then
#endif
}

}  // namespace s2o
