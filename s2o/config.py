"""S2OConfig: the knobs of s2o.attention and their defaults."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import typing
from dataclasses import dataclass
from typing import Literal

# Rows of one CUDA work unit (query heads of the unit x block_m; kCudaMaxUnitRows in
# csrc/include/s2o/params.h); block_m=None picks block_m = UNIT_ROWS // heads per unit, so that a
# unit fills one thread block of the CUDA kernel.
UNIT_ROWS = 128


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
            up to 12: one-pass counting sort on the GPU, no sort buffers).
        rank_head: rank only the head of each segment's list: its ``rank_head`` best keys (and
            keys tied with the last of them); the rest follows in index order, a cheaper write.
            The kernel stops long before the end of a long list, so the order of its tail rarely
            matters. 0: rank the whole history. None: from the threshold (resolve_rank_head).
            On CUDA a head needs rank_bits <= 12.
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

    # 128 ranks twice as many segments as 256 (the estimate costs 9.3 instead of 5.4 ms at 128K
    # on the H200) but ranks better: on the structured data at 128K at threshold 0.012, density
    # 0.052 / error 9.8% against 0.056 / 10.5% (benchmarks/quality.py): 3.50x instead of 3.13x
    # less density than pbs-qseg-s1024 at matched error.
    segment_size: int = 128
    block_m: int | None = None
    block_n: int = 64
    # Threshold 0.003 with patience 4: the sparsest measured point at which (nearly) every head
    # of every data set stays inside the 10% budget without being recomputed: SmolLM2-135M at 8K
    # (prose) no head above 10% (0.012: one, and 5 above 5%), random data at 128K 8.3% without
    # recomputation (0.012: every head recomputed), structured data at 128K one head of 32
    # recomputed (0.012: ten). Measurements in the README ("Error estimate and error budget").
    threshold: float = 0.003
    patience: int = 4
    # 0.05: the loosest round value that keeps every block of 128 rows of random data under 20%
    # (H200, all rows, benchmarks/attention_speed.py): at 128K worst block 16.4% (0.1, another
    # run: 23.8%), all rows 5.6%, no head recomputed, 371 ms (1.15x SDPA-flash) where without it
    # the budget recomputed all 32 heads exactly (503 ms); at 32K worst block 11.9% (without:
    # 25.9%). On the structured data at 128K it costs density (0.417 against 0.241: 189 against
    # 129 ms) and
    # buys the worst head 1.4% (without: 13.0%, four heads recomputed and one still over the
    # budget). SmolLM2-135M at 8K: density 0.590 / 0.587 (prose / code) against 0.488 / 0.490,
    # worst head 0.5% / 1.0% against 2.1% / 2.9%.
    tail_threshold: float | None = 0.05
    # One ranking per query head: the G heads of a KV group attend to different keys in trained
    # models, and their pooled mean ranks none of them well. SmolLM2-135M at 8K (threshold
    # 0.003, patience 4, budget 10%; all 270 heads, all rows): prose: kv_head density 0.562, 3
    # heads above 5%, worst 14.8%; query_head 0.488, none above 5%, worst 2.1%, p90 0.7%; code:
    # 0.583, 2 above 5%, worst 14.4% against 0.490, none, worst 2.9%. On the copy task at 4K
    # (second-copy rows) kv_head leaves 3 heads above 10% there, query_head none. It costs G
    # times the scoring and ranking work: H200, structured data, 128K: estimate 34 against 10 ms,
    # permute 12 against 3 ms, density 0.116 against 0.150 (benchmarks/attention_speed.py).
    ordering: Literal["kv_head", "query_head"] = "query_head"
    group_units: bool = False
    # 12 bits (sign, exponent, 3 mantissa bits): the GPU's one-pass counting sort (4096 bins); more
    # bits take CUB's radix sort. On the structured data at 8K it ranks as well as exact fp32 order
    # (density 0.4046 vs 0.4026, relative error 5.55% vs 5.61%).
    rank_bits: int = 12
    # None: block_n x max(64, 1/threshold) keys, the tile count rounded up to a power of two
    # (resolve_rank_head): a unit whose tile masses fall along its list stops within about
    # 1/threshold tiles. 8192 at the default threshold (16384 there gives the same density and error
    # at 64K and 128K, within 0.5%, with the variance term). Earlier, on the structured data at 128K
    # on the H200 (benchmarks/sweep_threshold.py, thresholds 0.003 / 0.004 / 0.006) ranking 16384
    # keys puts the points on the full ranking's error-vs-density curve (density 0.1037 / error
    # 9.17% vs 0.1050 / 9.03% at 0.004) and ranks 8 KV heads in 1.60 ms instead of 5.54 ms, while
    # 8192 loses accuracy (11.7% error at density 0.086, where ranking everything gives ~10.3%); on
    # the CPU at 16K (8 query heads) the rule's 8192 at threshold 0.01 and 4096 at 0.03 and 0.1 give
    # the full ranking's density and MSE (within 1.5%), half of them lose.
    rank_head: int | None = None
    # [ours] Weight of the variance term of the importance estimate, in units of the softmax scale:
    # estimate_importance gets variance_weight = score_variance * scale. 0 ranks by the mean
    # query alone (the paper's estimate); 0.5 is the Gaussian second-order estimate of what the
    # segment's rows spend on a key. H200, structured data, 128K, segment_size 256, threshold
    # 0.01: error 14.5% -> 9.6% at density 0.064 -> 0.061 (3.2 -> 5.4 ms of estimate); density
    # ratio against pbs-qseg at matched error 2.35x -> 3.02x (CPU, 16K: 1.40x -> 1.99x).
    score_variance: float = 0.5
    causal_alignment: Literal["top_left", "bottom_right"] = "top_left"
    # H200, Llama-3.1-8B head shape, structured data (benchmarks/attention_speed.py): s2o at the
    # defaults is 1.35x SDPA-flash / 0.69x SDPA-cuDNN at 8K, 1.84x / 0.97x at 16K, 3.03x / 1.81x at
    # 32K: up to 16K the cuDNN backend is faster.
    min_keys: int = 16384
    workspace_bytes: int = 512 * 2**20
    estimate_rows: int = 64
    error_budget: float | None = 0.10
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
        if self.rank_head is not None and self.rank_head < 0:
            raise ValueError(
                f"rank_head must be None or >= 0 (0: rank everything), got {self.rank_head}"
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
        divides segment_size with block_m * (heads per unit) <= UNIT_ROWS."""
        if self.block_m is not None:
            return self.block_m
        heads_per_unit = group_size if self.group_units else 1
        block_m = 1 << (max(1, UNIT_ROWS // heads_per_unit).bit_length() - 1)
        while self.segment_size % block_m:
            block_m //= 2
        return block_m

    def resolve_rank_head(self) -> int:
        """rank_head, or for None: block_n x the smallest power of two >= max(64, 1/threshold)
        tiles (0, everything, at threshold 0)."""
        if self.rank_head is not None:
            return self.rank_head
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
