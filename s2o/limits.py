"""The kernels' limits, as the C++ extension defines them (csrc/include/s2o/limits.h)."""

from __future__ import annotations

import torch

from . import _C

CUDA_BLOCK_N: int = _C.CUDA_BLOCK_N  # keys per tile of the CUDA kernels
CUDA_MAX_UNIT_ROWS: int = _C.CUDA_MAX_UNIT_ROWS  # most rows of one CUDA work unit
CUDA_HEAD_DIMS: tuple[int, ...] = _C.CUDA_HEAD_DIMS
CPU_MAX_HEAD_DIM: int = _C.CPU_MAX_HEAD_DIM
COUNTING_RANK_BITS: int = _C.COUNTING_RANK_BITS  # up to this: the GPU's one-pass counting sort
MAX_RANK_BITS: int = _C.MAX_RANK_BITS
# Levels of the quantised importance scores (csrc/include/s2o/quantized_scores.h).
SCORE_LEVELS: int = _C.SCORE_LEVELS
# The dtypes each device's kernels take, from c10's names ("Float", "BFloat16", "Half").
CPU_DTYPES: tuple[torch.dtype, ...] = tuple(getattr(torch, n.lower()) for n in _C.CPU_DTYPES)
CUDA_DTYPES: tuple[torch.dtype, ...] = tuple(getattr(torch, n.lower()) for n in _C.CUDA_DTYPES)
