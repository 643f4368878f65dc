// CUDA host wrapper of s2o::permute_indices (csrc/include/s2o/permute.cuh).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/device/device_segmented_radix_sort.cuh>

#include "checks.h"
#include "message.h"
#include "ops.h"
#include "s2o/permute.cuh"

namespace s2o {
namespace {

template <typename SortKey>
void rank_segments(const at::Tensor& scores, const SegmentLayout& layout, int rank_bits,
                   at::Tensor& indices) {
  const int64_t items = scores.numel();
  const int64_t num_pairs = scores.size(0) * scores.size(1);
  const int64_t num_segments = num_pairs * layout.num_segments();
  auto options = scores.options();
  const auto key_dtype = sizeof(SortKey) == 2 ? at::kShort : at::kInt;
  at::Tensor keys_in = at::empty({items}, options.dtype(key_dtype));
  at::Tensor keys_out = at::empty({items}, options.dtype(key_dtype));
  at::Tensor values_in = at::empty({items}, options.dtype(at::kInt));
  at::Tensor bounds = at::empty({2, num_segments}, options.dtype(at::kInt));
  auto* keys_in_ptr = reinterpret_cast<SortKey*>(keys_in.data_ptr());
  auto* keys_out_ptr = reinterpret_cast<SortKey*>(keys_out.data_ptr());
  const int32_t* begin = bounds.const_data_ptr<int32_t>();
  const int32_t* end = begin + num_segments;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const dim3 grid(unsigned(layout.num_segments()), unsigned(num_pairs));
  build_sort_keys_kernel<SortKey><<<grid, 256, 0, stream>>>(
      scores.const_data_ptr<float>(), layout, rank_bits, keys_in_ptr,
      values_in.mutable_data_ptr<int32_t>(), bounds.mutable_data_ptr<int32_t>(),
      bounds.mutable_data_ptr<int32_t>() + num_segments);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  size_t temp_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairs(
      nullptr, temp_bytes, keys_in_ptr, keys_out_ptr, values_in.const_data_ptr<int32_t>(),
      indices.mutable_data_ptr<int32_t>(), int(items), int(num_segments), begin, end, 0,
      rank_bits, stream));
  at::Tensor temp = at::empty({int64_t(temp_bytes)}, options.dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairs(
      temp.data_ptr(), temp_bytes, keys_in_ptr, keys_out_ptr, values_in.const_data_ptr<int32_t>(),
      indices.mutable_data_ptr<int32_t>(), int(items), int(num_segments), begin, end, 0,
      rank_bits, stream));
}

void counting_rank(const at::Tensor& scores, const SegmentLayout& layout, int rank_bits,
                   int64_t ranked_keys, at::Tensor& indices) {
  using C = CountingRank;
  C10_CUDA_CHECK(cudaFuncSetAttribute(counting_rank_kernel,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes));
  const dim3 grid(unsigned(scores.size(0) * scores.size(1)), unsigned(layout.num_segments()));
  counting_rank_kernel<<<grid, C::kThreads, C::kSmemBytes, c10::cuda::getCurrentCUDAStream()>>>(
      scores.const_data_ptr<float>(), layout, rank_bits, ranked_keys,
      indices.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void permute_indices_cuda(const PermuteIndicesCall& call) {
  const at::Tensor& scores = call.scores;
  const SegmentLayout& layout = call.layout;
  const int64_t rank_bits = call.rank_bits, ranked_keys = call.ranked_keys;
  const bool counting = rank_bits <= CountingRank::kBits;
  S2O_CHECK(counting || ranked_keys == 0, "permute_indices on CUDA ranks only a prefix (ranked_keys=",
            ranked_keys, ") with rank_bits <= ", kCountingRankBits, ", got rank_bits=", rank_bits);
  if (counting) {
    S2O_CHECK(layout.num_segments() <= 65535, "permute_indices on CUDA ranks at most 65535 "
                "segments per list, got ", layout.num_segments(), " (use a larger segment_size)");
  } else {  // CUB's segmented sort takes int offsets
    S2O_CHECK(scores.numel() < (int64_t(1) << 31), "permute_indices with rank_bits > ",
              kCountingRankBits, " sorts at most 2^31 - 1 keys in one call, got ", scores.numel(),
              " (rank fewer heads at a time)");
    S2O_CHECK(scores.size(0) * scores.size(1) <= 65535, "permute_indices with rank_bits > ",
              kCountingRankBits, " ranks at most 65535 (batch x heads) lists in one call, got ",
              scores.size(0) * scores.size(1));
  }
  if (scores.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(scores.device());
  if (counting) {
    counting_rank(scores, layout, int(rank_bits), ranked_keys, call.indices);
  } else if (rank_bits <= 16) {  // 16-bit sort keys: half the key traffic, at most two passes
    rank_segments<uint16_t>(scores, layout, int(rank_bits), call.indices);
  } else {
    rank_segments<uint32_t>(scores, layout, int(rank_bits), call.indices);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(s2o, CUDA, m) { m.impl("permute_indices", &permute_indices_op<permute_indices_cuda>); }

}  // namespace s2o
