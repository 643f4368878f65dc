// Switch-based dispatch over the element types and head dims the kernels are built for. Each
// macro runs the lambda it is given with the matching compile-time type or constant bound, and
// raises a clear error for anything else.
#pragma once

#include <ATen/core/Tensor.h>

#include "message.h"

// One case of a dispatch switch: runs the lambda with ALIAS bound to TYPE.
#define S2O_TYPE_CASE(ENUM, ALIAS, TYPE, ...) \
  case ENUM: {                                \
    using ALIAS = TYPE;                       \
    return __VA_ARGS__();                     \
  }

// CPU kernels: float32, bfloat16, float16 (arithmetic in float32 either way).
#define S2O_DISPATCH_CPU_FLOAT(DTYPE, NAME, ...)                                              \
  [&] {                                                                                       \
    switch (DTYPE) {                                                                          \
      S2O_TYPE_CASE(at::kFloat, scalar_t, float, __VA_ARGS__)                                 \
      S2O_TYPE_CASE(at::kBFloat16, scalar_t, c10::BFloat16, __VA_ARGS__)                      \
      S2O_TYPE_CASE(at::kHalf, scalar_t, c10::Half, __VA_ARGS__)                              \
      default:                                                                                \
        S2O_CHECK(false, NAME, ": unsupported dtype ", DTYPE,                                 \
                  " (float32, bfloat16 and float16 are supported on the CPU)");               \
    }                                                                                         \
  }()
