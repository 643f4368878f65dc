// One instantiation of the sparse attention kernel (see sparse_attention_launch.h).
#include "../sparse_attention_launch.cuh"

namespace s2o {
template void launch_sparse_attention<__half, 64, 128>(const SparseAttentionParams&, cudaStream_t);
}  // namespace s2o
