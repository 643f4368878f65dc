// Work sharing for the CPU kernels, whose work items differ in cost (causal histories grow along
// the sequence; early stopping ends units at different tiles).
#pragma once

#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>

namespace s2o::cpu {

// Runs body(state, i) for every i in [0, count) on the threads of ATen's pool, each thread with
// its own state = make_state(), taking the next i from a shared counter: order the items heaviest
// first and the threads finish together.
template <typename MakeState, typename Body>
void parallel_for_each(int64_t count, const MakeState& make_state, const Body& body) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t worker = begin; worker < end; ++worker) {
      auto state = make_state();
      for (int64_t i = next++; i < count; i = next++) body(state, i);
    }
  });
}

}  // namespace s2o::cpu
