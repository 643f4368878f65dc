// Switch-based dispatch over the element types and head dims the kernels are built for. Each
// macro runs the lambda it is given with the matching compile-time type or constant bound, and
// raises a clear error for anything else.
#pragma once

#include <torch/types.h>

#include "message.h"

// CPU kernels: float32, bfloat16, float16 (arithmetic in float32 either way).
#define S2O_DISPATCH_CPU_FLOAT(DTYPE, NAME, ...)                                   \
  [&] {                                                                            \
    switch (DTYPE) {                                                               \
      case at::kFloat: {                                                           \
        using scalar_t = float;                                                    \
        return __VA_ARGS__();                                                      \
      }                                                                            \
      case at::kBFloat16: {                                                        \
        using scalar_t = c10::BFloat16;                                            \
        return __VA_ARGS__();                                                      \
      }                                                                            \
      case at::kHalf: {                                                            \
        using scalar_t = c10::Half;                                                \
        return __VA_ARGS__();                                                      \
      }                                                                            \
      default:                                                                     \
        S2O_CHECK(false, NAME, ": unsupported dtype ", DTYPE,                    \
                    " (float32, bfloat16 and float16 are supported on the CPU)");  \
    }                                                                              \
  }()
