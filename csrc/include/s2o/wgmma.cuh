// Hopper warpgroup matrix instructions (wgmma, sm_90a) and the shared-memory layout they read.
// Torch-free. Every function here compiles to nothing useful outside sm_90a: callers guard with
// S2O_WGMMA_ENABLED.
//
// Shared-memory tiles: a [rows][kHeadDim] tile of 16-bit elements is stored as column blocks of
// 64 elements (128 bytes), one after the other; each block is [rows][128 bytes] with the 128-byte
// swizzle (16-byte chunk c of row r at chunk c ^ (r % 8)), in 1024-byte aligned atoms of 8 rows.
// The same tile serves wgmma as a K-major operand (rows = M or N, columns = the reduction: Q and
// K in S = Q K^T) and as an MN-major operand (rows = the reduction, columns = N: V in O = P V).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define S2O_WGMMA_ENABLED 1
#endif

namespace s2o {

// Byte offset of 16-byte chunk `chunk` of row `row` in a tile of kTileRows rows (layout above).
template <int kTileRows>
__device__ __forceinline__ uint32_t swizzle128(int row, int chunk) {
  return uint32_t((chunk >> 3) * kTileRows * 128 + row * 128 + (((chunk & 7) ^ (row & 7)) << 4));
}

// wgmma shared-memory matrix descriptor with the 128-byte swizzle: start address, leading and
// stride byte offsets (PTX ISA, "Matrix Descriptor Format"; all in 16-byte units).
// K-major: stride = 1024 (the next 8 rows), leading unused (1 by convention).
// MN-major: stride = 1024 (the next 8 rows of the reduction), leading = the next column block.
// Kept as two words so that moving the start address is one 32-bit add: shared addresses stay
// below 256 KiB, so the 14-bit address field never carries into the leading offset.
struct Swizzle128Descriptor {
  uint32_t low, high;

  __device__ __forceinline__ Swizzle128Descriptor(uint32_t address, uint32_t leading_bytes,
                                                  uint32_t stride_bytes)
      : low(((address & 0x3FFFF) >> 4) | ((leading_bytes >> 4) & 0x3FFF) << 16),
        high(((stride_bytes >> 4) & 0x3FFF) | 1u << 30) {}

  // The same matrix `bytes` further on (a multiple of 16).
  __device__ __forceinline__ uint64_t at(uint32_t bytes) const {
    return uint64_t(high) << 32 | (low + (bytes >> 4));
  }
};

#if defined(S2O_WGMMA_ENABLED)

// Orders this thread's generic-proxy shared-memory writes (cp.async included) before later
// async-proxy reads (wgmma operands). Needed before the barrier that publishes a tile.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Before the first wgmma of a batch: the accumulator and A registers written by ordinary
// instructions are visible to the warpgroup's asynchronous MMAs.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_wait_all() {
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}

// Keeps the compiler from moving reads or writes of wgmma registers across the asynchronous
// region: each register is "redefined" here, after the wait (or before the issue).
template <int kCount>
__device__ __forceinline__ void fence_registers(float (&r)[kCount]) {
#pragma unroll
  for (int i = 0; i < kCount; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int kCount>
__device__ __forceinline__ void fence_registers(uint32_t (&r)[kCount]) {
#pragma unroll
  for (int i = 0; i < kCount; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

#define S2O_D8(i)                                                                          \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define S2O_D32(i) S2O_D8(i), S2O_D8(i + 8), S2O_D8(i + 16), S2O_D8(i + 24)
#define S2O_ACC32                                                                              \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define S2O_ACC64                                                                              \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "  \
  "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "  \
  "%56, %57, %58, %59, %60, %61, %62, %63}"

template <typename Element>
struct WgmmaType;
template <>
struct WgmmaType<__nv_bfloat16> {
  static constexpr bool kBf16 = true;
};
template <>
struct WgmmaType<__half> {
  static constexpr bool kBf16 = false;
};

// The instructions for the operand type TYPE ("bf16" or "f16"); the scale-d operand must be a
// predicate, set from a register.
#define S2O_WGMMA_SS_N64(TYPE)                                                                 \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                  \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " " S2O_ACC32       \
               ", %32, %33, p, 1, 1, 0, 0;\n}\n"                                               \
               : S2O_D32(0)                                                                   \
               : "l"(a), "l"(b), "r"(scale_d))
#define S2O_WGMMA_RS_N64(TYPE)                                                                 \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                  \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " " S2O_ACC32       \
               ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                 \
               : S2O_D32(0)                                                                   \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1))
#define S2O_WGMMA_RS_N128(TYPE)                                                                \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                  \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " " S2O_ACC64      \
               ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                 \
               : S2O_D32(0), S2O_D32(32)                                                      \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1))

// D[64 x 64] (+)= A[64 x 16] B[16 x 64], A and B K-major in shared memory. scale_d = 0 ignores D.
template <typename Element>
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&d)[32], uint64_t a, uint64_t b,
                                                   int scale_d) {
  if constexpr (WgmmaType<Element>::kBf16) {
    S2O_WGMMA_SS_N64("bf16");
  } else {
    S2O_WGMMA_SS_N64("f16");
  }
}

// D[64 x kN] += A[64 x 16] B[16 x kN], A in registers (the m16n8k16 A fragment of each warp's 16
// rows), B MN-major in shared memory (kN = 64 or 128).
template <typename Element, int kN>
__device__ __forceinline__ void wgmma_rs(float (&d)[kN / 2], const uint32_t (&a)[4], uint64_t b) {
  static_assert(kN == 64 || kN == 128, "N of 64 or 128");
  constexpr bool kBf16 = WgmmaType<Element>::kBf16;
  if constexpr (kN == 64 && kBf16) {
    S2O_WGMMA_RS_N64("bf16");
  } else if constexpr (kN == 64) {
    S2O_WGMMA_RS_N64("f16");
  } else if constexpr (kBf16) {
    S2O_WGMMA_RS_N128("bf16");
  } else {
    S2O_WGMMA_RS_N128("f16");
  }
}

#undef S2O_D8
#undef S2O_D32
#undef S2O_ACC32
#undef S2O_ACC64
#undef S2O_WGMMA_SS_N64
#undef S2O_WGMMA_RS_N64
#undef S2O_WGMMA_RS_N128

#endif  // S2O_WGMMA_ENABLED

}  // namespace s2o
