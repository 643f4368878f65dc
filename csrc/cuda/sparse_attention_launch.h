// Launch of the sparse attention kernels for one (element type, head dim, rows per block); each
// combination is compiled in its own file under instantiations/ so that builds run in parallel.
#pragma once

#include <cuda_runtime.h>

#include "s2o/params.h"

namespace s2o {

// The mma.sync kernel (sm_80 and later).
template <typename Element, int kHeadDim, int kRows>
void launch_sparse_attention(const SparseAttentionParams& p, cudaStream_t stream);

// The wgmma kernel (sm_90a); only built into a working kernel when the build targets sm_90a.
template <typename Element, int kHeadDim, int kRows>
void launch_sparse_attention_sm90(const SparseAttentionParams& p, cudaStream_t stream);

}  // namespace s2o
