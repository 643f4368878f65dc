// The ranking key of a history key's importance score, shared by the CPU and CUDA kernels so that
// both rank identically.
//
// A score maps to an unsigned integer that preserves its order (NaN ranks above everything, so a
// NaN key is visited first and propagates into the output as in dense attention; -0 == +0), and
// only the top `rank_bits` bits of that integer take part in the ranking. Keys are ranked by
// falling rank key; equal rank keys keep the lower key index first.
#pragma once

#include <cstdint>
#include <cstring>

#include "s2o/layout.h"
#include "s2o/limits.h"

namespace s2o {

S2O_HOST_DEVICE uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

// Order-preserving map of a score to [0, 2^rank_bits), larger = more important. Written as
// selects, not branches: the GPU ranking kernels call it once per key.
S2O_HOST_DEVICE uint32_t rank_key(float score, int rank_bits) {
  const uint32_t bits = float_bits(score);
  uint32_t u = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  u = score == 0.0f ? 0x80000000u : u;
  u = score != score ? 0xFFFFFFFFu : u;
  return u >> (kMaxRankBits - rank_bits);
}

}  // namespace s2o
