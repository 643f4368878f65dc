// The integer arithmetic of s2o::estimate_importance, shared by the CPU and CUDA kernels. [ours]
//
// A score is an exact integer dot product of quantised vectors scaled once, so any summation
// order (the CPU's loops, the GPU's int8 tensor cores) gives the same bits and both devices rank
// the history identically:
//   key bound     m[d] = max |k[j][d]| over all keys of the call (per batch entry and KV head;
//                 all, not only those some segment sees, so that a shard of the queries
//                 scores as the whole does)
//   keys          k~[j][d]  = quantize(k[j][d], gain(m[d]))
//                 k2~[j][d] = quantize(k[j][d] * k[j][d], gain(m[d] * m[d]))
//   segment       w[d] = r[d] * m[d], W = max_d |w[d]|, r~[d] = quantize(w[d], gain(W))
//                 (with a variance term likewise c[d] * m[d]^2 -> c~, W2)
//   score(j)      = float(sum_d r~[d] k~[j][d]) * step(W)
//                   [+ float(sum_d c~[d] k2~[j][d]) * step(W2), as one fma]
// with kScoreLevels levels each side of 0 throughout.
// Scaling each key dimension by its own bound keeps the few large dimensions of trained keys
// from flattening the others; r~ . k~ * W / L^2 approximates r . k to about 1 / (2 L) of
// W sqrt(D), far below the ranking key's resolution (12 bits of the fp32 score).
#pragma once

#include <cmath>
#include <cstdint>

#include "s2o/layout.h"

namespace s2o {

// Levels of both terms: 12-bit signed values. |r~ . k~| <= D * 2047^2 < 2^31 up to D = 256
// (kCpuMaxHeadDim), and on the GPU each value splits exactly into two int8 parts (split_levels).
// Why not int8 (one GPU product instead of four): for the mean term it measured the same, but
// the variance term at 127 levels raised the quality smoke's MSE at 4K by 8% against fp32 scores
// (at 2047: within 0.1%).
constexpr int kScoreLevels = 2047;

// Multiplier that maps [-bound, bound] onto [-kScoreLevels, kScoreLevels] (0 for a zero bound).
S2O_HOST_DEVICE float quantization_gain(float bound) {
#if defined(__CUDA_ARCH__)
  return bound > 0.0f ? __fdiv_rn(float(kScoreLevels), bound) : 0.0f;
#else
  return bound > 0.0f ? static_cast<float>(kScoreLevels) / bound : 0.0f;
#endif
}

// x * gain rounded half to even, clamped to [-kScoreLevels, kScoreLevels] (NaN: -kScoreLevels on
// both devices).
S2O_HOST_DEVICE int32_t quantize(float x, float gain) {
  constexpr float kLevels = static_cast<float>(kScoreLevels);
#if defined(__CUDA_ARCH__)
  return __float2int_rn(fminf(fmaxf(__fmul_rn(x, gain), -kLevels), kLevels));
#else
  const float y = std::fmin(std::fmax(x * gain, -kLevels), kLevels);
  // Adding and taking away 1.5 * 2^23 rounds |y| < 2^22 to an integer, half to even (the default
  // rounding mode), as __float2int_rn does; std::nearbyint is a libm call.
  constexpr float kRounder = 12582912.0f;
  return static_cast<int32_t>((y + kRounder) - kRounder);
#endif
}

// The value of one unit of a product of two quantised vectors with bounds `bound` and 1.
S2O_HOST_DEVICE float dequantization_step(float bound) {
  constexpr float kSquare = static_cast<float>(kScoreLevels * kScoreLevels);  // exact in fp32
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(bound, kSquare);
#else
  return bound / kSquare;
#endif
}

// The score of one key from its two integer dot products.
S2O_HOST_DEVICE float integer_score(int32_t mean_dot, float mean_step, bool with_variance,
                                    int32_t variance_dot, float variance_step) {
#if defined(__CUDA_ARCH__)
  const float mean = __fmul_rn(__int2float_rn(mean_dot), mean_step);
  return with_variance ? __fmaf_rn(__int2float_rn(variance_dot), variance_step, mean) : mean;
#else
  const float mean = static_cast<float>(mean_dot) * mean_step;
  return with_variance ? std::fma(static_cast<float>(variance_dot), variance_step, mean) : mean;
#endif
}

}  // namespace s2o
