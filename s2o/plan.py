"""Plan: one call's S2OConfig resolved against its shapes into what the three ops take.

``Plan.for_call`` is the one place a config becomes op arguments (q_offset from the causal
alignment, block_m from the GQA group, the ranked keys from the threshold, the KV-head chunks
from the workspace budget). s2o.attention, the reference
pipeline (s2o.reference), the tests and the benchmarks all run the ops through a plan, so they
cannot disagree on what default s2o computes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from . import ops
from .config import S2OConfig
from .layout import SegmentLayout, ceil_div
from .limits import COUNTING_RANK_BITS


def softmax_scale(head_dim: int, scale: float | None = None) -> float:
    """``scale``, or SDPA's default 1/sqrt(head_dim) (the kernels' default too: csrc/checks.h)."""
    return 1.0 / math.sqrt(head_dim) if scale is None else scale


@dataclass(frozen=True)
class Plan:
    """Everything the three ops need, resolved once (see the ops in s2o.ops for each field)."""

    layout: SegmentLayout
    order_per_kv_head: bool
    group_units: bool
    block_m: int
    block_n: int
    threshold: float
    patience: int
    tail_threshold: float | None
    rank_bits: int
    ranked_keys: int
    score_variance: float
    scale: float | None = None  # the softmax scale; None: 1/sqrt(D)
    # KV-head ranges [begin, end) that s2o.attention ranks and attends one after the other (None:
    # all at once).
    kv_chunks: tuple[tuple[int, int], ...] | None = None

    @classmethod
    def for_call(
        cls,
        config: S2OConfig,
        query_shape: torch.Size | tuple[int, ...],
        key_shape: torch.Size | tuple[int, ...],
        *,
        is_causal: bool,
        scale: float | None = None,
        q_offset: int | None = None,
    ) -> Plan:
        """The plan of one ``[B, Hq, Nq, D]`` x ``[B, Hkv, Nk, D]`` call with this config;
        ``q_offset``: query row 0's position (None: from ``config.causal_alignment``)."""
        batch, q_heads, num_queries, _ = query_shape
        kv_heads, num_keys = key_shape[1], key_shape[2]
        group = q_heads // kv_heads
        if q_offset is None:
            q_offset = causal_q_offset(num_queries, num_keys, is_causal, config.causal_alignment)
        layout = SegmentLayout(num_queries, num_keys, config.segment_size, q_offset, is_causal)
        lists_per_kv_head = 1 if config.order_per_kv_head else group
        return cls(
            layout=layout,
            order_per_kv_head=config.order_per_kv_head,
            group_units=config.group_units,
            block_m=config.resolve_block_m(group),
            block_n=config.block_n,
            threshold=config.threshold,
            patience=config.patience,
            tail_threshold=config.tail_threshold,
            rank_bits=config.rank_bits,
            ranked_keys=config.resolve_ranked_keys(),
            score_variance=config.score_variance,
            scale=scale,
            kv_chunks=_kv_head_chunks(
                batch * lists_per_kv_head * layout.total_history,
                kv_heads,
                config.rank_bits,
                config.workspace_bytes,
            ),
        )

    def replace(self, **changes) -> Plan:
        return dataclasses.replace(self, **changes)

    def estimate(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """``ops.estimate_importance`` with this plan: scores ``[B, H_ord, T]``."""
        return ops.estimate_importance(
            query,
            key,
            **self.segment_args(),
            order_per_kv_head=self.order_per_kv_head,
            score_variance=self.score_variance,
            scale=self.scale,
        )

    def permute(self, scores: torch.Tensor) -> torch.Tensor:
        """``ops.permute_indices`` with this plan: ranked indices ``[B, H_ord, T]``."""
        return ops.permute_indices(
            scores,
            num_queries=self.layout.num_queries,
            num_keys=self.layout.num_keys,
            **self.segment_args(),
            rank_bits=self.rank_bits,
            ranked_keys=self.ranked_keys,
        )

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        indices: torch.Tensor,
        *,
        unit_threshold: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``ops.sparse_attention`` with this plan: ``(out, lse, tile_counts)``."""
        return ops.sparse_attention(
            query, key, value, indices, **self.attend_args(), unit_threshold=unit_threshold
        )

    def run(self, query, key, value):
        """The three ops in sequence: ``(scores, indices, (out, lse, tile_counts))``."""
        scores = self.estimate(query, key)
        indices = self.permute(scores)
        return scores, indices, self.attend(query, key, value, indices)

    def segment_args(self) -> dict:
        """The segment layout as the ops take it."""
        return dict(
            segment_size=self.layout.segment_size,
            q_offset=self.layout.q_offset,
            is_causal=self.layout.is_causal,
        )

    def attend_args(self) -> dict:
        """Every keyword argument of ``ops.sparse_attention`` but ``unit_threshold``."""
        return dict(
            **self.segment_args(),
            order_per_kv_head=self.order_per_kv_head,
            group_units=self.group_units,
            block_m=self.block_m,
            block_n=self.block_n,
            threshold=self.threshold,
            patience=self.patience,
            tail_threshold=self.tail_threshold,
            scale=self.scale,
        )

    def dense_tiles(self) -> int:
        """Tiles one unit head of dense attention computes at this plan's tile sizes (the
        denominator of density per unit head and batch entry)."""
        layout, block_m = self.layout, self.block_m
        return sum(
            layout.dense_tiles(min((t + 1) * block_m, layout.num_queries), self.block_n)
            for t in range(ceil_div(layout.num_queries, block_m))
        )


def causal_q_offset(num_queries: int, num_keys: int, is_causal: bool, alignment: str) -> int:
    """The position of query row 0 under ``alignment`` (``S2OConfig.causal_alignment``)."""
    if not is_causal or alignment == "top_left":
        return 0
    if num_queries > num_keys:
        raise ValueError(
            f"bottom-right causal alignment needs Nq <= Nk, got Nq={num_queries}, Nk={num_keys}"
        )
    return num_keys - num_queries


def ranking_bytes_per_entry(rank_bits: int) -> int:
    """Scratch bytes per history entry of one ordering head while ranking: the fp32 score and the
    ranked index; above the counting sort's bits the CUDA radix sort adds two sort keys (2 or 4
    bytes each; counted as 8, headroom for CUB's temporary storage) and the key index sorted."""
    return 4 + 4 if rank_bits <= COUNTING_RANK_BITS else 4 + 2 * 8 + 4 + 4


def _kv_head_chunks(
    entries_per_kv_head: int, kv_heads: int, rank_bits: int, workspace_bytes: int
) -> tuple[tuple[int, int], ...]:
    """As many KV heads per chunk as keep the ranking scratch (``entries_per_kv_head`` history
    entries each) within ``workspace_bytes``; at least one."""
    per_kv_head = entries_per_kv_head * ranking_bytes_per_entry(rank_bits)
    per_chunk = max(1, min(kv_heads, workspace_bytes // max(1, per_kv_head)))
    return tuple((h, min(h + per_chunk, kv_heads)) for h in range(0, kv_heads, per_chunk))
