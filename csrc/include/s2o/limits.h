// The kernels' limits, written once: the C++ checks use them and s2o._C exports them to Python
// (s2o/limits.py), so no limit is mirrored by hand.
#pragma once

namespace s2o {

// Keys per tile of the CUDA attention kernels (the op's block_n must equal it on CUDA).
constexpr int kCudaBlockN = 64;
// Most query rows of one CUDA work unit (unit heads x block_m), padded to 64 or 128 rows per
// thread block; S2OConfig picks block_m so that units fill it.
constexpr int kCudaMaxUnitRows = 128;
// The head dims the CUDA kernels are built for (cuda/cuda_dispatch.h).
constexpr int kCudaHeadDims[] = {64, 128};
// Largest head dim the CPU kernels take.
constexpr int kCpuMaxHeadDim = 256;
// Ranking keys of up to this many bits take the GPU's one-pass counting sort (2^12 bins); more
// bits take CUB's radix sort, which cannot rank only a prefix of a list.
constexpr int kCountingRankBits = 12;
// Bits of the full ranking key (the fp32 score's order-preserving map).
constexpr int kMaxRankBits = 32;

}  // namespace s2o
