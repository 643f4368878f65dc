// Definitions of the launch functions of sparse_attention_launch.h, included by the one-instance
// translation units setup.py generates (attention_instantiations).
#pragma once

#include <c10/cuda/CUDAException.h>

#include "s2o/sparse_attention.cuh"
#include "s2o/sparse_attention_sm90.cuh"
#include "sparse_attention_launch.h"

namespace s2o {

template <typename Kernel>
void launch_attention_kernel(Kernel kernel, int threads, int smem_bytes,
                             const SparseAttentionParams& p, cudaStream_t stream) {
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  const dim3 grid(unsigned(p.num_q_tiles), unsigned(p.units), unsigned(p.batch));
  kernel<<<grid, threads, smem_bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Element, int kHeadDim, int kRows>
void launch_sparse_attention(const SparseAttentionParams& p, cudaStream_t stream) {
  using Traits = SparseAttentionTraits<Element, kHeadDim, kRows>;
  launch_attention_kernel(sparse_attention_kernel<Traits>, Traits::kThreads, Traits::kSmemBytes, p,
                          stream);
}

template <typename Element, int kHeadDim, int kRows>
void launch_sparse_attention_sm90(const SparseAttentionParams& p, cudaStream_t stream) {
  using Traits = Sm90AttentionTraits<Element, kHeadDim, kRows>;
  launch_attention_kernel(sparse_attention_sm90_kernel<Traits>, Traits::kThreads,
                          Traits::kSmemBytes, p, stream);
}

}  // namespace s2o
