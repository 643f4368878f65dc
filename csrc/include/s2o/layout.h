// Segment and history layout shared by host code, CPU kernels and CUDA kernels.
//
// Query rows are cut into segments of `segment_size` rows. Query row i sits at absolute position
// i + q_offset. With causal masking, segment s's *history* is the keys strictly before its first
// row's position: [0, min(s * segment_size + q_offset, num_keys)). Without a mask every segment's
// history is all keys. Scores and permutations are stored ragged: per (batch, ordering head) the
// segments' histories one after the other, segment s starting at history_offset(s). Every size
// here depends only on shapes and parameters, never on data.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define S2O_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define S2O_HOST_DEVICE inline
#endif

namespace s2o {

struct SegmentLayout {
  int64_t num_queries;   // Nq
  int64_t num_keys;      // Nk
  int64_t segment_size;  // S, rows per segment
  int64_t q_offset;      // absolute position of query row 0
  bool is_causal;

  S2O_HOST_DEVICE int64_t num_segments() const {
    return (num_queries + segment_size - 1) / segment_size;
  }

  // Absolute position of the first query row of segment s.
  S2O_HOST_DEVICE int64_t segment_start(int64_t s) const { return s * segment_size + q_offset; }

  S2O_HOST_DEVICE int64_t history_length(int64_t s) const {
    if (!is_causal) return num_keys;
    const int64_t start = segment_start(s);
    return start < num_keys ? (start > 0 ? start : 0) : num_keys;
  }

  // Sum of history_length over segments [0, s), in closed form.
  S2O_HOST_DEVICE int64_t history_offset(int64_t s) const {
    if (!is_causal) return s * num_keys;
    // Segments below `growing` have history start(s) < Nk; later ones see all Nk keys.
    const int64_t room = num_keys - q_offset;
    const int64_t growing = room > 0 ? (room + segment_size - 1) / segment_size : 0;
    const int64_t m = s < growing ? s : growing;
    return m * q_offset + segment_size * m * (m - 1) / 2 + (s - m) * num_keys;
  }

  S2O_HOST_DEVICE int64_t total_history() const { return history_offset(num_segments()); }
};

// Number of tiles of `tile` elements covering n elements.
S2O_HOST_DEVICE int64_t ceil_div(int64_t n, int64_t tile) { return (n + tile - 1) / tile; }

}  // namespace s2o
