"""s2o.varlen_attention: packed sequences of different lengths (flash-attn 2's varlen layout), K/V
contiguous or in a paged cache.

Each sequence b has queries ``q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]`` and keys
``k[cu_seqlens_k[b]:cu_seqlens_k[b+1]]`` (or, with ``block_table``, its key pages
``k[block_table[b, p]]`` in order, ``cu_seqlens_k`` still giving its length). Causal is
bottom-right per sequence: its queries are the last positions of its keys (chunked prefill
against a cache). The result of every sequence is that of ``s2o.attention`` on it alone (same
ranking, same stop rule, same error estimate and budget, same dense fallbacks).

This first version runs the sequences one after the other through the same pipeline
(:func:`s2o.attention.run_pieces`), reading the offsets on the host once (a synchronisation)
and copying a paged sequence's pages into place. Moving the per-sequence layout into the ops
(offsets on the device, the gather through the page table, work balanced across sequences) is
what comes next; the semantics and the argument checks here are the ones the ops will keep.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch

from .attention import (
    QueryPiece,
    S2OStats,
    _fallback_reason,
    _StageClock,
    announce_fallback,
    dense_piece,
    positive_scale,
    sparse_call,
)
from .config import S2OConfig
from .plan import Plan

# Page sizes the paged layout takes: a multiple of 16 rows (the kernels' row alignment).
PAGE_ALIGNMENT = 16


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    block_table: torch.Tensor | None = None,
    config: S2OConfig | None = None,
    return_lse: bool = False,
    return_stats: bool = False,
):
    """s2o attention of packed sequences, with flash-attn 2's varlen conventions.

    Args:
        q: ``[total_q, Hq, D]``, the sequences' queries one after the other.
        k, v: ``[total_k, Hkv, D]``; with ``block_table``: ``[num_pages, page_size, Hkv, D]``.
            Hq a multiple of Hkv (MHA, GQA, MQA).
        cu_seqlens_q, cu_seqlens_k: int32 ``[B+1]`` on q's device: 0, then each sequence's end.
        max_seqlen_q, max_seqlen_k: the longest sequence's query and key lengths.
        causal: bottom-right causal per sequence (needs each sequence's query count <= its key
            count); False: every query sees all its sequence's keys.
        softmax_scale: the softmax scale (None: 1/sqrt(D)).
        block_table: int32 ``[B, max_pages]``: sequence b's keys are the rows of pages
            ``block_table[b, 0], block_table[b, 1], ...`` (entries past its length unread).
        config: the s2o.S2OConfig (``causal_alignment`` is taken as ``"bottom_right"``).
        return_lse: also return the log-sum-exp ``[Hq, total_q]`` fp32.
        return_stats: also return one :class:`s2o.S2OStats` per sequence.

    Returns:
        ``out [total_q, Hq, D]``, then ``lse`` and the stats list when asked for.
    """
    config = S2OConfig() if config is None else config
    if not isinstance(config, S2OConfig):
        raise TypeError(f"config must be an s2o.S2OConfig or None, got {type(config).__name__}")
    starts_q, starts_k = _check_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, block_table
    )
    config = dataclasses.replace(config, causal_alignment="bottom_right")
    q, scale = positive_scale(q, softmax_scale)
    out = q.new_empty(q.shape)
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32) if return_lse else None
    all_stats = []
    for b in range(len(starts_q) - 1):
        rows = slice(starts_q[b], starts_q[b + 1])
        query = q[rows].transpose(0, 1)[None]  # [1, Hq, n_q, D], a view
        key, value = (_sequence_keys(t, b, starts_k, block_table) for t in (k, v))
        seq_out, seq_lse, stats = _attend_sequence(
            query, key, value, causal, scale, config, return_stats
        )
        out[rows] = seq_out[0].transpose(0, 1)
        if lse is not None:
            lse[:, rows] = seq_lse[0]
        all_stats.append(stats)
    returned = [out] + ([lse] if return_lse else []) + ([all_stats] if return_stats else [])
    return returned[0] if len(returned) == 1 else tuple(returned)


def _sequence_keys(t, b, starts_k, block_table) -> torch.Tensor:
    """Sequence b's keys (or values) ``[1, Hkv, n_k, D]``: a view of the packed rows, or its
    pages copied into order."""
    length = starts_k[b + 1] - starts_k[b]
    if block_table is None:
        return t[starts_k[b] : starts_k[b + 1]].transpose(0, 1)[None]
    page_size = t.shape[1]
    pages = block_table[b, : -(-length // page_size)].long()
    rows = t.index_select(0, pages).flatten(0, 1)[:length]  # [n_k, Hkv, D]
    return rows.transpose(0, 1)[None]


def _attend_sequence(query, key, value, causal, scale, config, return_stats):
    """One sequence as s2o.attention would compute it, with its lse: (out, lse, stats)."""
    clock = _StageClock(query.device) if return_stats else None
    if query.shape[2] == 0 or key.shape[2] == 0:
        # No rows, or (non-causal) no keys: flash-attn's output, zeros with lse -inf.
        out = torch.zeros_like(query)
        lse = query.new_full(query.shape[:3], float("-inf"), dtype=torch.float32)
        return out, lse, S2OStats(path="dense", fallback_reason="empty")
    plan = Plan.for_call(config, query.shape, key.shape, is_causal=causal, scale=scale)
    piece = QueryPiece(query, key, value, plan, first_row=0)
    fallback = _fallback_reason(query, key, value, None, 0.0, config)
    if fallback is not None:
        what = "varlen_attention would fall back to dense attention"
        reason = announce_fallback(fallback, config, what)
        out, lse = dense_piece(piece)
        return out, lse, S2OStats(path="dense", fallback_reason=reason)
    result, stats = sparse_call(piece, config, clock)
    return result.outs[0], result.lses[0], stats


def _check_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, block_table
) -> tuple[list[int], list[int]]:
    """Raises for arguments with no meaning, naming the argument; returns the offsets (read on
    the host)."""
    for name, tensor in (
        ("q", q),
        ("k", k),
        ("v", v),
        ("cu_seqlens_q", cu_seqlens_q),
        ("cu_seqlens_k", cu_seqlens_k),
    ):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    paged = block_table is not None
    kv_rank = 4 if paged else 3
    kv_shape = "[num_pages, page_size, Hkv, D]" if paged else "[total_k, Hkv, D]"
    if q.dim() != 3:
        raise ValueError(f"q must be [total_q, Hq, D], got shape {tuple(q.shape)}")
    for name, tensor in (("k", k), ("v", v)):
        if tensor.dim() != kv_rank:
            raise ValueError(f"{name} must be {kv_shape}, got shape {tuple(tensor.shape)}")
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    heads, head_dim = k.shape[-2], k.shape[-1]
    if q.shape[2] != head_dim:
        raise ValueError(
            f"q and k must have the same head dim, got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if heads == 0 or q.shape[1] % heads:
        raise ValueError(
            f"q's head count must be a multiple of k's, got q {tuple(q.shape)} and "
            f"k {tuple(k.shape)}"
        )
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, tensor in (
        ("k", k),
        ("v", v),
        ("cu_seqlens_q", cu_seqlens_q),
        ("cu_seqlens_k", cu_seqlens_k),
    ):
        if tensor.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {tensor.device}")
    starts = {}
    for name, offsets, total in (
        ("cu_seqlens_q", cu_seqlens_q, q.shape[0]),
        ("cu_seqlens_k", cu_seqlens_k, None if paged else k.shape[0]),
    ):
        if offsets.dtype != torch.int32 or offsets.dim() != 1 or offsets.shape[0] < 2:
            raise ValueError(
                f"{name} must be int32 [B+1] with B >= 1, got {offsets.dtype} "
                f"{tuple(offsets.shape)}"
            )
        values = offsets.tolist()
        if values[0] != 0:
            raise ValueError(f"{name} must start at 0, got {values[0]}")
        if any(b < a for a, b in itertools.pairwise(values)):
            raise ValueError(f"{name} must be non-decreasing, got {values}")
        if total is not None and values[-1] != total:
            raise ValueError(f"{name} must end at the packed length {total}, got {values[-1]}")
        starts[name] = values
    starts_q, starts_k = starts["cu_seqlens_q"], starts["cu_seqlens_k"]
    if len(starts_q) != len(starts_k):
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same batch, got "
            f"{len(starts_q) - 1} and {len(starts_k) - 1} sequences"
        )
    lengths_q = [b - a for a, b in itertools.pairwise(starts_q)]
    lengths_k = [b - a for a, b in itertools.pairwise(starts_k)]
    for name, given, lengths in (
        ("max_seqlen_q", max_seqlen_q, lengths_q),
        ("max_seqlen_k", max_seqlen_k, lengths_k),
    ):
        if isinstance(given, bool) or not isinstance(given, int) or given < max(lengths):
            raise ValueError(
                f"{name} must be an int >= the longest sequence ({max(lengths)}), got {given!r}"
            )
    if causal:
        for b, (n_q, n_k) in enumerate(zip(lengths_q, lengths_k, strict=True)):
            if n_q > n_k:
                raise ValueError(
                    f"causal (bottom-right) needs each sequence's query count <= its key count; "
                    f"sequence {b} has {n_q} queries (cu_seqlens_q) and {n_k} keys (cu_seqlens_k)"
                )
    if paged:
        _check_block_table(block_table, k, q.device, lengths_k)
    return starts_q, starts_k


def _check_block_table(block_table, k, device, lengths_k) -> None:
    num_pages, page_size = k.shape[0], k.shape[1]
    if (
        not isinstance(block_table, torch.Tensor)
        or block_table.dtype != torch.int32
        or (block_table.dim() != 2)
    ):
        shown = (
            f"{block_table.dtype} {tuple(block_table.shape)}"
            if isinstance(block_table, torch.Tensor)
            else type(block_table).__name__
        )
        raise ValueError(f"block_table must be int32 [B, max_pages], got {shown}")
    if block_table.device != device:
        raise ValueError(f"block_table must be on q's device {device}, got {block_table.device}")
    if block_table.shape[0] != len(lengths_k):
        raise ValueError(
            f"block_table must have one row per sequence ({len(lengths_k)}), got "
            f"{block_table.shape[0]}"
        )
    if page_size == 0 or page_size % PAGE_ALIGNMENT:
        raise ValueError(
            f"page size (k.shape[1]) must be a positive multiple of "
            f"{PAGE_ALIGNMENT}, got {page_size}"
        )
    table = block_table.tolist()
    for b, length in enumerate(lengths_k):
        used = -(-length // page_size)
        if used > block_table.shape[1]:
            raise ValueError(
                f"block_table has {block_table.shape[1]} pages per sequence; "
                f"sequence {b} needs {used} for {length} keys"
            )
        bad = [p for p in table[b][:used] if not 0 <= p < num_pages]
        if bad:
            raise ValueError(
                f"block_table[{b}] holds pages out of range [0, {num_pages}): {bad[:4]}"
            )
