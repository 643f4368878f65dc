"""S2OConfig: the knobs of s2o.attention and their defaults."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import typing
from dataclasses import dataclass
from typing import Literal

from .limits import COUNTING_RANK_BITS, CUDA_MAX_UNIT_ROWS


@dataclass
class S2OConfig:
    """How s2o.attention computes sparse attention.

    Attributes:
        segment_size: query rows per segment; each segment ranks its history once.
        block_m: query rows per tile (per head); must divide segment_size. None: 128 rows per work
            unit, i.e. 128 // G with ``group_units`` and 128 otherwise.
        block_n: keys per tile.
        threshold: stop once every row of a query tile gets less than this share of its softmax
            mass from the latest history tile (for ``patience`` tiles in a row). 0: exact.
        patience: consecutive quiet tiles before stopping.
        tail_threshold: a history tile also keeps a query tile going while the tiles left,
            were each as heavy as it, could add this share of a row's mass (the bar of tile t is
            ``min(threshold, tail_threshold / tiles left)``): diffuse rows, whose tiles weigh
            alike, run on; rows whose tiles fall off fast stop where ``threshold`` stops them.
            None: ``threshold`` alone.
        ordering: ``"kv_head"``: one ranking per KV head, shared by the G query heads of its
            group; ``"query_head"``: one ranking per query head (G times the ranking work).
        group_units: with ``"kv_head"`` ordering, the G query heads of a group form one work unit
            that loads each K/V tile once for all of them and stops together (the loudest head
            decides for all); False: every query head stops on its own.
        rank_bits: bits of the score's order-preserving key used for ranking (32: exact order;
            up to s2o.limits.COUNTING_RANK_BITS: one-pass counting sort on the GPU, no sort
            buffers).
        ranked_keys: rank only a prefix of each segment's list: its ``ranked_keys`` best keys (and
            keys tied with the last of them); the rest follows in index order, a cheaper write.
            The kernel stops long before the end of a long list, so the order of its tail rarely
            matters. 0: rank the whole history. None: from the threshold (resolve_ranked_keys).
            On CUDA a prefix needs rank_bits <= s2o.limits.COUNTING_RANK_BITS.
        score_variance: weight of the second-order term of the importance estimate (the rows'
            per-dimension variance against the key squared), in units of the softmax scale; 0.5
            is the Gaussian estimate of what a segment spends on a key. 0: the mean query alone.
        causal_alignment: where queries sit when ``is_causal`` and Nq < Nk: ``"top_left"``
            (SDPA's is_causal: query i at position i) or ``"bottom_right"`` (queries are the last Nq
            positions: chunked prefill with a KV cache).
        min_keys: sequences with fewer keys go to dense SDPA (too short to gain).
        workspace_bytes: scratch budget of the ranking (scores, sort buffers, indices grow with
            the square of the length): KV heads are processed in chunks that fit it (at least
            one KV head per chunk).
        estimate_rows: query rows per head computed exactly on every sparse call to estimate the
            error of each head (s2o.error_estimate; reported in S2OStats). 0: no estimate (and
            no budget).
        error_budget: heads whose estimated relative L2 error exceeds it are recomputed on the
            device (no host sync), exactly; counted in S2OStats. In strict mode the call raises
            S2OErrorBudgetError naming the head instead. None: no budget.
        strict: raise instead of falling back to dense SDPA (also: environment S2O_STRICT=1),
            or, with error_budget, instead of recomputing a head over the budget.
    """

    # Why each default: README, "Knobs" (and the sections it points to).
    segment_size: int = 128  # ranks better than 256 at 128K, for twice the estimate
    block_m: int | None = None
    block_n: int = 64
    threshold: float = 0.003  # with patience 4: sparsest point with every head in the budget
    patience: int = 4
    tail_threshold: float | None = 0.05  # loosest round value keeping random data's blocks < 20%
    ordering: Literal["kv_head", "query_head"] = "query_head"  # trained heads of a group differ
    group_units: bool = False  # one unit per query head beat one per group at every density
    rank_bits: int = COUNTING_RANK_BITS  # ranks as well as exact fp32 order, one GPU pass
    ranked_keys: int | None = None  # from the threshold: the stop rule never reads much further
    score_variance: float = 0.5  # Gaussian second-order estimate: better at every length
    causal_alignment: Literal["top_left", "bottom_right"] = "top_left"  # SDPA's is_causal
    min_keys: int = 16384  # below, cuDNN's dense attention is faster
    workspace_bytes: int = 512 * 2**20
    estimate_rows: int = 64
    error_budget: float | None = 0.10  # the spec's per-head budget
    strict: bool = False

    def __post_init__(self) -> None:
        self._check_types()
        if self.ordering not in ("kv_head", "query_head"):
            raise ValueError(f"ordering must be 'kv_head' or 'query_head', got {self.ordering!r}")
        if self.causal_alignment not in ("top_left", "bottom_right"):
            raise ValueError(
                "causal_alignment must be 'top_left' or 'bottom_right', "
                f"got {self.causal_alignment!r}"
            )
        for name in ("segment_size", "block_n", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.block_m is not None and (self.block_m < 1 or self.segment_size % self.block_m != 0):
            raise ValueError(
                f"block_m must be positive and divide segment_size={self.segment_size}, "
                f"got {self.block_m}"
            )
        if not 0 <= self.threshold <= 1:
            # A tile's share of its row's mass is at most 1: a larger threshold would stop every
            # unit after its first history tile whatever the data.
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.tail_threshold is not None and not 0 <= self.tail_threshold < math.inf:
            raise ValueError(
                f"tail_threshold must be finite and >= 0 (or None), got {self.tail_threshold}"
            )
        if self.group_units and self.ordering != "kv_head":
            raise ValueError("group_units needs ordering='kv_head'")
        if not 1 <= self.rank_bits <= 32:
            raise ValueError(f"rank_bits must be in [1, 32], got {self.rank_bits}")
        if not (math.isfinite(self.score_variance) and self.score_variance >= 0):
            raise ValueError(f"score_variance must be finite and >= 0, got {self.score_variance}")
        if self.estimate_rows < 0:
            raise ValueError(f"estimate_rows must be >= 0, got {self.estimate_rows}")
        if self.error_budget is not None:
            if not (math.isfinite(self.error_budget) and self.error_budget >= 0):
                raise ValueError(
                    f"error_budget must be None or finite and >= 0, got {self.error_budget}"
                )
            if self.estimate_rows == 0:
                raise ValueError("error_budget needs estimate_rows > 0 (the per-head estimate)")
        if self.ranked_keys is not None and self.ranked_keys < 0:
            raise ValueError(
                f"ranked_keys must be None or >= 0 (0: rank everything), got {self.ranked_keys}"
            )

    def _check_types(self) -> None:
        """TypeError naming the field for a value of the wrong type (a float segment size, a
        string threshold), before the range checks compare it."""
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            accepted = _accepted_types()[item.name]
            # bool is an int to Python, never a count or a number here.
            if isinstance(value, bool) and bool not in accepted or not isinstance(value, accepted):
                names = " or ".join("None" if t is type(None) else t.__name__ for t in accepted)
                raise TypeError(
                    f"S2OConfig.{item.name} must be {names}, got {value!r} ({type(value).__name__})"
                )

    @property
    def order_per_kv_head(self) -> bool:
        return self.ordering == "kv_head"

    def resolve_block_m(self, group_size: int) -> int:
        """block_m for a GQA group size G: the configured one, or the largest power of two that
        divides segment_size with block_m * (heads per unit) <= the rows of a CUDA work unit
        (so that a unit fills one thread block of the CUDA kernel)."""
        if self.block_m is not None:
            return self.block_m
        heads_per_unit = group_size if self.group_units else 1
        block_m = 1 << (max(1, CUDA_MAX_UNIT_ROWS // heads_per_unit).bit_length() - 1)
        while self.segment_size % block_m:
            block_m //= 2
        return block_m

    def resolve_ranked_keys(self) -> int:
        """ranked_keys, or for None: block_n x the smallest power of two >= max(64, 1/threshold)
        tiles (0, everything, at threshold 0)."""
        if self.ranked_keys is not None:
            return self.ranked_keys
        if self.threshold == 0:
            return 0
        tiles = max(64, math.ceil(1.0 / self.threshold))
        return self.block_n * (1 << (tiles - 1).bit_length())

    def is_strict(self) -> bool:
        return self.strict or os.environ.get("S2O_STRICT", "0") == "1"


@functools.cache
def _accepted_types() -> dict[str, tuple[type, ...]]:
    """Per S2OConfig field, the types its annotation accepts (a float field also takes an int;
    a Literal takes its values' type; the values themselves are checked in __post_init__)."""
    accepted = {}
    for name, hint in typing.get_type_hints(S2OConfig).items():
        options = typing.get_args(hint) if typing.get_origin(hint) is not Literal else (hint,)
        types: list[type] = []
        for option in options or (hint,):
            if typing.get_origin(option) is Literal:
                types += {type(v) for v in typing.get_args(option)}
            elif option is float:
                types += [float, int]
            else:
                types.append(option)
        accepted[name] = tuple(dict.fromkeys(types))
    return accepted
