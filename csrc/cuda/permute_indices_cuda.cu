// CUDA host wrapper of s2o::permute_indices (csrc/include/s2o/permute.cuh).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/device/device_radix_sort.cuh>

#include "checks.h"
#include "s2o/permute.cuh"

namespace s2o {
namespace {

// Bits needed to number `count` segments.
int bits_for(int64_t count) {
  int bits = 0;
  while ((int64_t(1) << bits) < count) ++bits;
  return bits;
}

template <typename SortKey>
void rank_segments(const at::Tensor& scores, const SegmentLayout& layout, int rank_bits,
                   int end_bit, at::Tensor& indices) {
  const int64_t items = scores.numel();
  const int64_t num_pairs = scores.size(0) * scores.size(1);
  auto options = scores.options();
  const auto key_dtype = sizeof(SortKey) == 8 ? at::kLong : at::kInt;
  at::Tensor keys_in = at::empty({items}, options.dtype(key_dtype));
  at::Tensor keys_out = at::empty({items}, options.dtype(key_dtype));
  at::Tensor values_in = at::empty({items}, options.dtype(at::kInt));
  auto* keys_in_ptr = reinterpret_cast<SortKey*>(keys_in.data_ptr());
  auto* keys_out_ptr = reinterpret_cast<SortKey*>(keys_out.data_ptr());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  if (layout.num_segments() > 0 && num_pairs > 0) {
    const dim3 grid(unsigned(layout.num_segments()), unsigned(num_pairs));
    build_sort_keys_kernel<SortKey><<<grid, 256, 0, stream>>>(
        scores.const_data_ptr<float>(), layout, rank_bits, keys_in_ptr,
        values_in.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  size_t temp_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, temp_bytes, keys_in_ptr, keys_out_ptr, values_in.const_data_ptr<int32_t>(),
      indices.mutable_data_ptr<int32_t>(), items, 0, end_bit, stream));
  at::Tensor temp = at::empty({int64_t(temp_bytes)}, options.dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      temp.data_ptr(), temp_bytes, keys_in_ptr, keys_out_ptr, values_in.const_data_ptr<int32_t>(),
      indices.mutable_data_ptr<int32_t>(), items, 0, end_bit, stream));
}

at::Tensor permute_indices_cuda(const at::Tensor& scores, int64_t num_queries, int64_t num_keys,
                                int64_t segment_size, int64_t q_offset, bool is_causal,
                                int64_t rank_bits) {
  TORCH_CHECK(scores.defined() && scores.scalar_type() == at::kFloat,
              "scores must be a float32 tensor (from estimate_importance)");
  TORCH_CHECK(num_queries >= 1, "num_queries must be >= 1, got ", num_queries);
  TORCH_CHECK(num_keys >= 1, "num_keys must be >= 1, got ", num_keys);
  check_rank_bits(rank_bits);
  const SegmentLayout layout = check_layout(num_queries, num_keys, segment_size, q_offset, is_causal);
  const int64_t total = layout.total_history();
  TORCH_CHECK(scores.dim() == 3 && scores.size(2) == total,
              "scores must have shape [B, ordering heads, ", total,
              "] (the total history for these shapes and parameters), got ", scores.sizes());
  TORCH_CHECK(scores.numel() < (int64_t(1) << 31), "permute_indices sorts at most 2^31 - 1 keys in "
              "one call, got ", scores.numel(), " (rank fewer heads at a time)");

  const c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor scores_c = scores.contiguous();
  at::Tensor indices = at::empty(scores.sizes(), scores.options().dtype(at::kInt));
  if (scores.numel() == 0) return indices;
  const int segment_bits = bits_for(scores.size(0) * scores.size(1) * layout.num_segments());
  const int end_bit = segment_bits + int(rank_bits);
  if (end_bit <= 32) {
    rank_segments<uint32_t>(scores_c, layout, int(rank_bits), end_bit, indices);
  } else {
    rank_segments<uint64_t>(scores_c, layout, int(rank_bits), end_bit, indices);
  }
  return indices;
}

}  // namespace

TORCH_LIBRARY_IMPL(s2o, CUDA, m) { m.impl("permute_indices", &permute_indices_cuda); }

}  // namespace s2o
