// One instantiation of the sm_90a sparse attention kernel (see sparse_attention_launch.h).
#include "../sparse_attention_launch.cuh"

namespace s2o {
template void launch_sparse_attention_sm90<__nv_bfloat16, 64, 128>(const SparseAttentionParams&, cudaStream_t);
}  // namespace s2o
