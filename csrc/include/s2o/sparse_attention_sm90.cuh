// The early-stopping sparse attention kernel for Hopper (sm_90a, wgmma). Torch-free.
//
// Same function as sparse_attention.cuh (the sm_80 kernel; its header explains work units, tiles
// and the stop rule), with the two GEMMs of each tile on warpgroup MMAs: one warpgroup per 64 rows
// of the unit (kRows = 64 or 128), S = Q K^T as wgmma m64n64k16 from shared memory, the online
// softmax on the accumulator registers, and O += P V as wgmma m64nDk16 with P from registers.
// K/V rows are gathered through the index list with cp.async, double-buffered, into the 128-byte
// swizzled layout of wgmma.cuh.
//
// The loads, the online softmax, the stop vote and the epilogue are the sm_80 kernel's
// (attention_tile.cuh: TilePipeline, ThreadRows); only the products and the shared layout differ.
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
struct Sm90AttentionTraits : AttentionTraits<Element_, kHeadDim_, kRows_> {
  using Base = AttentionTraits<Element_, kHeadDim_, kRows_>;
  using typename Base::Element;
  using Base::kBlockN, Base::kHeadDim, Base::kRows;
  static constexpr int kWarpGroups = kRows / 64;  // one wgmma m64 row block each
  static constexpr int kThreads = kWarpGroups * 128;
  static constexpr int kQBytes = kRows * kHeadDim * 2;
  static constexpr int kTileBytes = kBlockN * kHeadDim * 2;
  using Pipeline = TilePipeline<Element, kHeadDim, kBlockN, kThreads, 128>;  // 128-byte rows
  // Q, then K and V double-buffered: 1024-byte aligned for the swizzle atoms.
  static constexpr int kSmemBytes = 1024 + kQBytes + 4 * kTileBytes + Pipeline::kSmemBytes;
  static_assert(Pipeline::Gather::kTileBytes == kTileBytes, "one stage per tile");
  static_assert(kHeadDim == 64 || kHeadDim == 128, "wgmma N of the P V product");
  static_assert(kBlockN == 64, "the S = Q K^T product is one m64n64 wgmma per k step");
};

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, 2)
    sparse_attention_sm90_kernel(const __grid_constant__ SparseAttentionParams p) {
#if defined(S2O_WGMMA_ENABLED)
  using Element = typename Traits::Element;
  constexpr int D = Traits::kHeadDim, kRows = Traits::kRows, kBlockN = Traits::kBlockN;

  extern __shared__ unsigned char smem_raw[];
  // Dynamic shared memory is only 16-byte aligned by contract: round up to the swizzle atom.
  unsigned char* smem = smem_raw + ((1024 - smem_address(smem_raw) % 1024) % 1024);
  const uint32_t s_q = smem_address(smem);
  const uint32_t s_k = s_q + Traits::kQBytes;            // [2] tiles
  const uint32_t s_v = s_k + 2 * Traits::kTileBytes;     // [2] tiles
  int32_t* s_index = reinterpret_cast<int32_t*>(smem + Traits::kQBytes + 4 * Traits::kTileBytes);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const WorkUnit unit(p, kBlockN);
  if (unit.skip(tid)) return;
  const int b = blockIdx.z;
  // K and V in the 128-byte swizzled layout of wgmma.cuh.
  typename Traits::Pipeline pipeline(
      p, unit, b, tid, s_k, s_v, s_index,
      [](int row, int chunk) { return swizzle128<kBlockN>(row, chunk); });
  pipeline.template start<kRows>(
      p, b, [&](int r, int chunk) { return s_q + swizzle128<kRows>(r, chunk); });

  // This thread's rows: warp w holds rows 16 w + lane / 4 and 16 w + lane / 4 + 8 of the block
  // (warpgroup w / 4 computes rows 64 (w / 4) .. + 64).
  ThreadRows<1, D> rows(p, unit, warp * 16, lane);

  // Descriptors of this warpgroup's 64 query rows and of the K and V tiles of stage 0. K steps
  // move the start address: 32 bytes per 16 columns inside a 128-byte column block, then to the
  // next block.
  const Swizzle128Descriptor q_desc(s_q + uint32_t((warp / 4) * 64 * 128), 16, 1024);
  const Swizzle128Descriptor k_desc(s_k, 16, 1024);
  const Swizzle128Descriptor v_desc(s_v, kBlockN * 128, 1024);
  auto qk_offset = [](int step, int tile_rows) {
    return uint32_t((step / 4) * tile_rows * 128 + (step % 4) * 32);
  };
  float(&o_flat)[D / 2] = reinterpret_cast<float(&)[D / 2]>(rows.o);

  for (int t = 0; t < unit.n_tiles; ++t) {
    // The gathered tile is read by wgmma (the async proxy).
    if (!pipeline.begin_tile(t, p.patience, [] { fence_proxy_async(); })) break;
    const uint32_t stage_bytes = uint32_t((t % 2) * Traits::kTileBytes);
    rows.begin_tile();

    // S = Q K^T for the warpgroup's 64 rows x 64 keys.
    float s[1][kBlockN / 8][4];
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

    rows.template softmax<kBlockN, kBlockN>(s, unit, t, 0, p.scale_log2);

    // O += P V: P from registers, V [keys][D] as the MN-major B operand (16 keys per k step).
    uint32_t a[kBlockN / 16][4];
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) pack_probabilities<Element, kBlockN>(a[kk], s[0], kk);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      wgmma_rs<Element, D>(o_flat, a[kk], v_desc.at(stage_bytes + uint32_t(kk * 16 * 128)));
    }
    wgmma_commit();
    wgmma_wait_all();
    fence_registers(o_flat);
    pipeline.end_tile(t, rows, p.tail_threshold);
  }
  pipeline.finish();
  rows.template store<Element>(p, unit, b);
#else
  __trap();  // built without sm_90a: the host never launches this kernel then
#endif
}

}  // namespace s2o
