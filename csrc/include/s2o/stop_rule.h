// The stop rule's bar for one history tile, shared by the CPU and CUDA kernels so that both
// compute it bit for bit. [ours] A tile is quiet when every row of the unit got less than this
// share of its mass so far from it. Besides `threshold` the rule projects the tile onto the
// `remaining` history tiles after it: were each of them as heavy as this one, they would add
// remaining x its gain, and that too must stay below `tail_threshold` of the mass. A diffuse row,
// whose tiles weigh alike, then runs until what is left could add at most about tail_threshold
// of its mass; a concentrated row, whose tile gains fall off fast, stops almost where
// `threshold` alone stops it. tail_threshold = +inf: threshold alone.
#pragma once

#include <cmath>
#include <cstdint>

#include "s2o/layout.h"

namespace s2o {

S2O_HOST_DEVICE float tile_stop_threshold(float threshold, float tail_threshold,
                                          int64_t remaining_tiles) {
  return remaining_tiles > 0 ? fminf(threshold, tail_threshold / float(remaining_tiles))
                             : threshold;
}

}  // namespace s2o
