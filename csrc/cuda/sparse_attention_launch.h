// Launch of the sparse attention kernel for one (element type, head dim, rows per block); each
// combination is compiled in its own file under instantiations/ so that builds run in parallel.
#pragma once

#include <cuda_runtime.h>

#include "s2o/params.h"

namespace s2o {

template <typename Element, int kHeadDim, int kRows>
void launch_sparse_attention(const SparseAttentionParams& p, cudaStream_t stream);

}  // namespace s2o
