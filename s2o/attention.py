"""s2o.attention: a drop-in for torch.nn.functional.scaled_dot_product_attention.

Cases the sparse path does not serve go to dense SDPA, each reason logged once; with
``config.strict`` or ``S2O_STRICT=1`` they raise :class:`S2OFallbackError` instead, so a benchmark
never measures the fallback by accident.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import error_estimate, reference
from .config import S2OConfig
from .limits import CPU_DTYPES, CPU_MAX_HEAD_DIM, CUDA_DTYPES, CUDA_HEAD_DIMS
from .plan import Plan, causal_q_offset

logger = logging.getLogger("s2o")

# The dense attention s2o falls back to, captured before patch_sdpa can replace it.
_sdpa = F.scaled_dot_product_attention

# Fallbacks that are the normal route for some calls (decode steps, short prompts): logged at
# INFO; the others at WARNING.
_EXPECTED_FALLBACKS = {"decode", "short"}
_logged_reasons: set[str] = set()


class S2OFallbackError(RuntimeError):
    """Raised in strict mode when s2o.attention would fall back to dense SDPA."""


class S2OErrorBudgetError(RuntimeError):
    """Raised in strict mode when a head's estimated error exceeds ``config.error_budget``."""


@dataclass
class S2OStats:
    """What one s2o.attention call did.

    Attributes:
        path: ``"sparse"`` or ``"dense"`` (fallback).
        fallback_reason: why it went dense, or None.
        density: tiles computed / tiles of dense attention at the same tile size (sparse path).
        tile_counts: int32 ``[B, H_ord, num_query_tiles]``, tiles computed per query tile.
        dense_tiles: total tiles dense attention would compute for the same shapes.
        block_m, block_n: the tile sizes used.
        time_ms: milliseconds per stage (``estimate``, ``permute``, ``attend``, ``check`` (the
            error estimate and the recomputation of heads over the budget); or ``dense``): GPU
            time between CUDA events on the current stream (wall time on the CPU), measured
            only when stats are asked for.
        head_error: fp32 ``[B, Hq]``, each head's estimated relative L2 error of the sparse pass
            (``config.estimate_rows`` sampled rows computed exactly; see s2o.error_estimate),
            before any recomputation. None without an estimate.
        recomputed: bool ``[B, Hq]``, the heads recomputed exactly because their estimate
            exceeded ``config.error_budget`` (their tiles are counted in ``density``).
        error: the estimated relative L2 error of the whole returned output (recomputed heads
            count as exact), or None.
        recomputed_heads: how many heads were recomputed.
    """

    path: str
    fallback_reason: str | None = None
    density: float | None = None
    tile_counts: torch.Tensor | None = None
    dense_tiles: int | None = None
    block_m: int | None = None
    block_n: int | None = None
    time_ms: dict[str, float] = field(default_factory=dict)
    head_error: torch.Tensor | None = None
    recomputed: torch.Tensor | None = None
    error: float | None = None
    recomputed_heads: int = 0


def _devices_with_kernels() -> frozenset[str]:
    # Looked up once at import (after s2o._C registered the kernels): torch.compile cannot trace
    # the dispatcher query.
    return frozenset(
        device
        for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
        if torch._C._dispatch_has_kernel_for_dispatch_key("s2o::sparse_attention", key)
    )


_KERNEL_DEVICES = _devices_with_kernels()


def announce_fallback(fallback: tuple[str, str], config: S2OConfig, what: str) -> str:
    """A dense fallback ``(reason, detail)``: raises S2OFallbackError in strict mode (the message
    ``what (reason): detail``), else logs it once; returns the reason."""
    reason, detail = fallback
    if config.is_strict():
        raise S2OFallbackError(f"{what} ({reason}): {detail}")
    _log_once(reason, detail)
    return reason


def positive_scale(query: torch.Tensor, scale: float | None):
    """``(query, scale)`` with the scale made positive: softmax(scale * q.k) = softmax(|scale| *
    (-q).k), and the ranking and the variance term need a positive scale."""
    return (-query, -scale) if scale is not None and scale < 0 else (query, scale)


def _log_once(reason: str, detail: str) -> None:
    if reason in _logged_reasons:
        return
    _logged_reasons.add(reason)
    level = logging.INFO if reason in _EXPECTED_FALLBACKS else logging.WARNING
    logger.log(level, "s2o.attention: dense SDPA fallback (%s): %s", reason, detail)


def _check_arguments(query, key, value, dropout_p, scale, enable_gqa) -> None:
    """Raises for calls SDPA rejects or that have no meaning, naming the argument passed."""
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale must be finite (or None: 1/sqrt(head dim)), got {scale}")
    if query.dim() != key.dim() or query.dim() < 2:
        return  # the rank fallback (or SDPA) reports it
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"query and key must have the same head dim, got query {tuple(query.shape)} "
            f"and key {tuple(key.shape)}"
        )
    if query.dim() == 4 and enable_gqa:
        q_heads, kv_heads = query.shape[1], key.shape[1]
        if (q_heads % kv_heads) if kv_heads else q_heads:
            raise ValueError(
                "enable_gqa=True needs the query head count to be a multiple of the key head "
                f"count, got query {tuple(query.shape)} and key {tuple(key.shape)} "
                f"({q_heads} and {kv_heads} heads)"
            )


def _fallback_reason(
    query, key, value, attn_mask, dropout_p, config, *, num_queries=None, num_keys=None
) -> tuple[str, str] | None:
    """(reason, detail) when the sparse path cannot serve this call, else None. ``num_queries``,
    ``num_keys``: the call's lengths where query and key hold only part of it (None: theirs)."""
    if attn_mask is not None:
        return "attn_mask", "a general attention mask is not supported by the sparse path"
    if dropout_p > 0.0:
        return "dropout", "dropout_p > 0 is not supported by the sparse path"
    if torch.is_grad_enabled() and (
        query.requires_grad or key.requires_grad or value.requires_grad
    ):
        return "autograd", "gradients are required; the sparse path is forward-only"
    if query.dim() not in (3, 4) or key.dim() != query.dim() or value.dim() != query.dim():
        return (
            "rank",
            f"inputs of rank {query.dim()}; the sparse path takes [B, H, N, D] or [B, N, D]",
        )
    num_queries = query.shape[-2] if num_queries is None else num_queries
    num_keys = key.shape[-2] if num_keys is None else num_keys
    if num_queries == 1:
        return "decode", "a single query row (decode step)"
    if num_keys < config.min_keys:
        return "short", f"{num_keys} keys < config.min_keys={config.min_keys}"
    if value.shape[-1] != query.shape[-1] or value.shape[:-1] != key.shape[:-1]:
        return "value_shape", "value must have key's shape (same head count, length, head dim)"
    if not (query.dtype == key.dtype == value.dtype):
        return "dtype", "query, key and value dtypes differ"
    device = query.device.type
    if device not in _KERNEL_DEVICES:
        return "device", f"no s2o kernel for device {device!r} in this build"
    head_dim = query.shape[-1]
    if device == "cpu":
        if query.dtype not in CPU_DTYPES or head_dim > CPU_MAX_HEAD_DIM:
            return "dtype", f"CPU kernel takes {CPU_DTYPES} and head dim <= {CPU_MAX_HEAD_DIM}"
    elif query.dtype not in CUDA_DTYPES or head_dim not in CUDA_HEAD_DIMS:
        return "dtype", f"CUDA kernel takes {CUDA_DTYPES} and head dim in {CUDA_HEAD_DIMS}"
    return None


def _dense_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, config):
    """Dense SDPA with the config's causal alignment. SDPA's ``is_causal`` is top-left, so
    bottom-right causal attention with Nq != Nk (chunked prefill against a cache) gets its mask
    spelled out: query i sees keys up to i + Nk - Nq."""
    num_queries, num_keys = query.shape[-2], key.shape[-2]
    if is_causal and attn_mask is None and num_queries != num_keys:
        q_offset = causal_q_offset(num_queries, num_keys, True, config.causal_alignment)
        if q_offset:
            attn_mask = torch.ones(num_queries, num_keys, dtype=torch.bool, device=query.device)
            attn_mask = attn_mask.tril(diagonal=q_offset)
            is_causal = False
    return _sdpa(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
    )


class _StageClock:
    """Time per stage, only used when stats are asked for. On a GPU: CUDA events recorded on the
    current stream between the stages, read once at the end (GPU time, no synchronisation between
    stages, so the stages run as they do without stats). On the CPU: wall time."""

    def __init__(self, device: torch.device):
        self.on_cuda = device.type == "cuda"
        self.device = device
        self.marks: list[tuple[str, object]] = [("", self._mark())]

    def _mark(self):
        if not self.on_cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def lap(self, name: str) -> None:
        """Ends stage `name` (times of repeated names add up)."""
        self.marks.append((name, self._mark()))

    @property
    def times(self) -> dict[str, float]:
        if self.on_cuda:
            self.marks[-1][1].synchronize()
        times: dict[str, float] = {}
        for (_, begin), (name, end) in itertools.pairwise(self.marks):
            ms = begin.elapsed_time(end) if self.on_cuda else (end - begin) * 1e3
            times[name] = times.get(name, 0.0) + ms
        return times


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    config: S2OConfig | None = None,
    return_stats: bool = False,
):
    """Sparse prefill attention with the signature, defaults and output of
    ``torch.nn.functional.scaled_dot_product_attention``.

    query ``[B, Hq, Nq, D]``, key/value ``[B, Hkv, Nk, D]`` (or ``[B, N, D]``); GQA/MQA needs
    ``enable_gqa=True`` as in SDPA. Returns the attention output ``[B, Hq, Nq, D]``, and with
    ``return_stats=True`` a tuple ``(out, S2OStats)``.
    """
    if config is None:
        config = S2OConfig()
    elif not isinstance(config, S2OConfig):
        raise TypeError(f"config must be an s2o.S2OConfig or None, got {type(config).__name__}")
    _check_arguments(query, key, value, dropout_p, scale, enable_gqa)
    clock = _StageClock(query.device) if return_stats else None

    if query.dim() == 4 and key.dim() == 4 and query.shape[1] != key.shape[1] and not enable_gqa:
        # Same contract as SDPA: differing head counts need enable_gqa; SDPA raises its own error.
        return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale)
    if query.numel() == 0 or key.numel() == 0 or value.numel() == 0:
        # Zero heads, rows or head dim: nothing to sparsify. An empty output is made here (SDPA
        # itself divides by zero on zero heads with enable_gqa in some builds); otherwise (no
        # keys) SDPA's result.
        out_shape = (*query.shape[:-1], value.shape[-1])
        if math.prod(out_shape) == 0:
            out = query.new_empty(out_shape)
        else:
            out = _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                        enable_gqa=enable_gqa)  # fmt: skip
        return (out, S2OStats(path="dense", fallback_reason="empty")) if return_stats else out

    fallback = _fallback_reason(query, key, value, attn_mask, dropout_p, config)
    if fallback is not None:
        reason = announce_fallback(fallback, config, "s2o.attention would fall back to dense SDPA")
        out = _dense_sdpa(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, config
        )
        if clock is None:
            return out
        clock.lap("dense")
        return out, S2OStats(path="dense", fallback_reason=reason, time_ms=clock.times)

    query, scale = positive_scale(query, scale)
    squeeze_heads = query.dim() == 3
    if squeeze_heads:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    plan = Plan.for_call(config, query.shape, key.shape, is_causal=is_causal, scale=scale)
    result, stats = sparse_call(QueryPiece(query, key, value, plan, first_row=0), config, clock)
    out = result.outs[0]
    if squeeze_heads:
        out = out.squeeze(1)
    return out if clock is None else (out, stats)


def sparse_call(
    piece: QueryPiece, config: S2OConfig, clock: _StageClock | None
) -> tuple[PiecesResult, S2OStats | None]:
    """The sparse path of a call that is one piece (all its rows in this process): its result,
    and with a clock its stats (the heads recomputed over the budget logged once)."""
    result = run_pieces(
        [piece],
        query_shape=piece.query.shape,
        kv_chunks=piece.plan.kv_chunks,
        config=config,
        device=piece.query.device,
        clock=clock,
    )
    if clock is None:
        return result, None
    stats = pieces_stats([piece], result)
    stats.time_ms = clock.times
    if stats.recomputed is not None:
        _log_recomputed(stats.recomputed_heads, stats.recomputed.numel(), config.error_budget)
    return result, stats


def _log_recomputed(recomputed_heads: int, heads: int, budget: float | None) -> None:
    if recomputed_heads and "error_budget" not in _logged_reasons:
        _logged_reasons.add("error_budget")
        logger.warning(
            "s2o.attention: %d of %d heads exceeded error_budget=%g and were recomputed "
            "exactly (logged once; S2OStats.recomputed says which)",
            recomputed_heads,
            heads,
            budget,
        )


@dataclass
class QueryPiece:
    """Consecutive query rows of a call that run the three ops together.

    Attributes:
        query: ``[B, Hq, n, D]``, the piece's rows.
        key, value: ``[B, Hkv, Nk, D]``, the keys those rows see.
        plan: the piece's plan (its layout places the rows: q_offset, segments).
        first_row: the index of the piece's first row among the call's rows (where the error
            sample, drawn over all rows of the call, finds them).
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    plan: Plan
    first_row: int


@dataclass
class PiecesResult:
    """What :func:`run_pieces` computed: per piece its ``out`` ``[B, Hq, n, D]``, ``lse``
    ``[B, Hq, n]`` fp32 and ``tile_counts`` ``[B, H_unit, tiles]``; with an error estimate, per
    head of the call (fp32 ``[B, Hq]``): its estimated error, whether it was recomputed, and the
    estimate's squared error and squared reference (summed over all pieces of all ranks)."""

    outs: list[torch.Tensor]
    lses: list[torch.Tensor]
    tile_counts: list[torch.Tensor]
    head_error: torch.Tensor | None = None
    recomputed: torch.Tensor | None = None
    squared: torch.Tensor | None = None
    reference: torch.Tensor | None = None


def run_pieces(
    pieces: list[QueryPiece],
    *,
    query_shape: tuple[int, ...],
    kv_chunks: tuple[tuple[int, int], ...],
    config: S2OConfig,
    device: torch.device,
    clock: _StageClock | None = None,
    all_reduce=None,
) -> PiecesResult:
    """The sparse path of one call whose query rows are cut into ``pieces``: ranks and attends
    every piece, then estimates each head's error over all the call's rows and recomputes the
    heads over the budget. ``query_shape`` ``[B, Hq, N, D]`` is the whole call's (N rows, of
    which the pieces hold some); KV heads run in the ranges ``kv_chunks``.

    ``all_reduce`` (in-place sum of a tensor over the ranks that hold the other pieces; None:
    this process holds them all): with it the row sample and each head's estimate are those of
    the whole call, so every rank recomputes the same heads as one process would.
    """
    batch, q_heads, num_rows = query_shape[0], query_shape[1], query_shape[2]
    group = q_heads // kv_chunks[-1][1]
    reduce = all_reduce if all_reduce is not None else (lambda tensor: None)
    many_chunks = len(kv_chunks) > 1
    outs = [p.query.new_empty(p.query.shape) if many_chunks else None for p in pieces]
    lses = [p.query.new_empty(p.query.shape[:3], dtype=torch.float32) if many_chunks else None
            for p in pieces]  # fmt: skip
    counts: list[list[torch.Tensor]] = [[] for _ in pieces]
    sample = None  # per piece: the sampled rows as its own, their factors, their exact attention
    checks = []
    for kv_begin, kv_end in kv_chunks:
        heads = slice(kv_begin * group, kv_end * group)
        runs = []
        for piece in pieces:
            q = piece.query[:, heads]
            k, v = piece.key[:, kv_begin:kv_end], piece.value[:, kv_begin:kv_end]
            scores = piece.plan.estimate(q, k)
            if clock is not None:
                clock.lap("estimate")
            indices = piece.plan.permute(scores)
            del scores
            if clock is not None:
                clock.lap("permute")
            attend = functools.partial(piece.plan.attend, q, k, v, indices)
            runs.append([attend, *attend()])  # attend, out, lse, tile counts
            if clock is not None:
                clock.lap("attend")
        if config.estimate_rows > 0:
            if sample is None:
                shape = (batch * (heads.stop - heads.start), num_rows)
                outs_now = [run[1] for run in runs]
                sample = _draw_sample(pieces, outs_now, shape, config, reduce, device)
            squared = torch.zeros(batch, heads.stop - heads.start, device=device)
            reference = torch.zeros_like(squared)
            for run, (rows, factors, exact) in zip(runs, sample, strict=True):
                piece_squared, piece_reference = error_estimate.sampled_squared_error(
                    run[1], exact[:, heads], rows, factors
                )
                squared += piece_squared
                reference += piece_reference
            reduce(squared)
            reduce(reference)
            head_error = error_estimate.relative_error(squared, reference)
            over = torch.zeros_like(head_error, dtype=torch.bool)
            if config.error_budget is not None:
                if config.is_strict():
                    _raise_over_budget(head_error, kv_begin * group, config.error_budget)
                unit_threshold, over = _units_over_budget(head_error, config, group)
                for run in runs:
                    _recompute(run, unit_threshold, over)
                squared = torch.where(over, 0.0, squared)
            checks.append((head_error, over, squared, reference))
            if clock is not None:
                clock.lap("check")
        for i, (_, out, lse, tiles) in enumerate(runs):
            if many_chunks:
                outs[i][:, heads].copy_(out)
                lses[i][:, heads].copy_(lse)
            else:
                outs[i], lses[i] = out, lse
            counts[i].append(tiles)
        del runs
    result = PiecesResult(outs, lses, [torch.cat(c, dim=1) for c in counts])
    if checks:
        result.head_error, result.recomputed, result.squared, result.reference = (
            torch.cat(t, dim=1) for t in zip(*checks, strict=True)
        )
    return result


def _draw_sample(pieces, outs, norms_shape, config, reduce, device):
    """The error estimate's sampled rows, drawn over all rows of the call by the first KV chunk's
    output norms (pieces on other ranks contribute theirs through ``reduce``), and per piece the
    sampled rows as its own row indices, their expansion factors (0 for rows of other pieces)
    and their exact attention for every head: ``[(rows, factors, exact), ...]``. The
    exact rows of all heads come from one dense call per piece: one call per KV chunk (8-16
    chunks at 128K) costs several times more, each filling only part of the GPU."""
    norms = torch.zeros(norms_shape, device=device)  # [B * H_chunk, N]
    for piece, out in zip(pieces, outs, strict=True):
        norms[:, piece.first_row : piece.first_row + out.shape[2]] = (
            error_estimate.squared_row_norms(out)
        )
    reduce(norms)
    rows, factors = error_estimate.sample_rows(
        error_estimate.row_weights(norms), config.estimate_rows
    )
    per_piece = []
    for piece in pieces:
        local = rows - piece.first_row
        inside = (local >= 0) & (local < piece.query.shape[2])
        local = local.clamp(0, piece.query.shape[2] - 1)
        layout = piece.plan.layout
        exact = error_estimate.exact_rows(
            piece.query, piece.key, piece.value, local, q_offset=layout.q_offset,
            is_causal=layout.is_causal, scale=piece.plan.scale,
        )  # fmt: skip
        per_piece.append((local, torch.where(inside, factors, 0.0), exact))
    return per_piece


def dense_piece(piece: QueryPiece) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of one piece (the fallback): out in the query's dtype and lse fp32, in
    blocks of rows so that the fp32 logits stay near 2^26 entries."""
    query, layout = piece.query, piece.plan.layout
    heads, rows, keys = query.shape[1], query.shape[2], piece.key.shape[2]
    block = max(1, 2**26 // max(1, heads * keys * query.shape[0]))
    outs, lses = [], []
    for first in range(0, rows, block):
        out, lse = reference.dense_attention(
            query[:, :, first : first + block], piece.key, piece.value, is_causal=layout.is_causal,
            q_offset=layout.q_offset + first, scale=piece.plan.scale,
        )  # fmt: skip
        outs.append(out.to(query.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def pieces_stats(pieces: list[QueryPiece], result: PiecesResult) -> S2OStats:
    """The stats of a sparse call over ``pieces``: density and tile counts (concatenated over the
    pieces' query tiles) of these pieces, and the whole call's error estimate."""
    computed = sum(int(c.sum()) for c in result.tile_counts)
    dense = sum(
        p.plan.dense_tiles() * c.shape[0] * c.shape[1]
        for p, c in zip(pieces, result.tile_counts, strict=True)
    )
    stats = S2OStats(
        path="sparse",
        density=computed / dense if dense else None,
        tile_counts=torch.cat(result.tile_counts, dim=2) if result.tile_counts else None,
        dense_tiles=dense,
        block_m=pieces[0].plan.block_m if pieces else None,
        block_n=pieces[0].plan.block_n if pieces else None,
    )
    if result.head_error is not None:
        stats.head_error, stats.recomputed = result.head_error, result.recomputed
        stats.error = float(
            error_estimate.relative_error(result.squared.sum(), result.reference.sum())
        )
        stats.recomputed_heads = int(result.recomputed.sum())
    return stats


def _raise_over_budget(head_error: torch.Tensor, first_head: int, budget: float) -> None:
    """Strict mode: raises S2OErrorBudgetError for the worst head over the budget (a host sync)."""
    flat = int(head_error.flatten().argmax())
    worst = float(head_error.flatten()[flat])
    if worst > budget:
        batch, head = divmod(flat, head_error.shape[1])
        raise S2OErrorBudgetError(
            f"s2o.attention: query head {first_head + head} (batch {batch}) has an estimated "
            f"relative error of {worst:.1%}, above error_budget={budget:g}"
        )


def _units_over_budget(head_error: torch.Tensor, config: S2OConfig, group: int):
    """The heads to recompute because their estimate is over ``config.error_budget``: the
    unit threshold that recomputes them exactly (0) and skips every other unit (-1), and the
    heads it recomputes ([B, Hq] bool; with group_units a flagged head takes its whole KV group
    along). Exactly, not at a lower threshold: at 128K on the structured data a tenth of the
    threshold cost as much as exact (the flagged heads' rankings put the keys they miss late)
    and left a head at 13%."""
    error = head_error
    if config.group_units:
        error = error.unflatten(1, (-1, group)).amax(dim=2)  # per unit: its worst head
    unit_threshold = torch.where(error > config.error_budget, 0.0, -1.0).float()
    over = unit_threshold == 0
    if config.group_units:
        over = over.repeat_interleave(group, dim=1)
    return unit_threshold, over


def _recompute(run: list, unit_threshold: torch.Tensor, over: torch.Tensor) -> None:
    """Recomputes the flagged heads of one piece's ``run`` [attend, out, lse, tile counts] into
    it, on the device, in one more launch in which every other unit is skipped: a call with no
    head over the budget pays one skipped launch and one merge, and no host sync."""
    attend, out, lse, tiles = run
    redo, redo_lse, redo_tiles = attend(unit_threshold=unit_threshold)
    torch.where(over[:, :, None, None], redo, out, out=out)
    torch.where(over[:, :, None], redo_lse, lse, out=lse)
    run[3] = tiles + redo_tiles


@contextlib.contextmanager
def patch_sdpa(config: S2OConfig | None = None):
    """Within the block, ``torch.nn.functional.scaled_dot_product_attention`` is s2o.attention.

    Code that looked the function up before (``from torch.nn.functional import
    scaled_dot_product_attention``) keeps the original.
    """

    def scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=None,
        dropout_p=0.0,
        is_causal=False,
        scale=None,
        enable_gqa=False,
    ):
        return attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, config=config
        )

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = scaled_dot_product_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
