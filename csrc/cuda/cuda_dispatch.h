// Compile-time dispatch of the CUDA kernels: element type and head dimension.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/types.h>

#include "dispatch.h"
#include "message.h"

// Runs the lambda with `Element` bound to the CUDA type of DTYPE (bfloat16 or float16).
#define S2O_DISPATCH_CUDA_ELEMENT(DTYPE, NAME, ...)                                           \
  [&] {                                                                                       \
    switch (DTYPE) {                                                                          \
      S2O_TYPE_CASE(at::kBFloat16, Element, __nv_bfloat16, __VA_ARGS__)                       \
      S2O_TYPE_CASE(at::kHalf, Element, __half, __VA_ARGS__)                                  \
      default:                                                                                \
        S2O_CHECK(false, NAME, ": unsupported dtype ", DTYPE,                                 \
                  " (the CUDA kernels take bfloat16 and float16)");                           \
    }                                                                                         \
  }()

// Runs the lambda with `kHeadDim` bound to HEAD_DIM (64 or 128: kCudaHeadDims).
#define S2O_HEAD_DIM_CASE(VALUE, ...)    \
  case VALUE: {                          \
    constexpr int kHeadDim = VALUE;      \
    return __VA_ARGS__();                \
  }
#define S2O_DISPATCH_HEAD_DIM(HEAD_DIM, NAME, ...)                                            \
  [&] {                                                                                       \
    switch (HEAD_DIM) {                                                                       \
      S2O_HEAD_DIM_CASE(64, __VA_ARGS__)                                                      \
      S2O_HEAD_DIM_CASE(128, __VA_ARGS__)                                                     \
      default:                                                                                \
        S2O_CHECK(false, NAME, ": unsupported head dim ", HEAD_DIM,                           \
                  " (the CUDA kernels take 64 and 128)");                                     \
    }                                                                                         \
  }()
