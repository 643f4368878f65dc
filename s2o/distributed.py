"""Context-parallel s2o prefill over torch.distributed: each rank holds a shard of the sequence.

``context_parallel_attention`` gathers K/V from every rank of the group (one all-gather, as
Llama 3's context parallelism does) and runs s2o on the rank's own query rows with their causal
offsets. The result equals single-process ``s2o.attention`` on the whole sequence: the shards
are cut at segment boundaries, so every segment ranks the same history with the same
representative query (the same index lists, bit for bit), and the error estimate is drawn over
all rows of all ranks and summed across them, so the heads over the error budget are the same
ones one process would recompute.

Why not a ring that passes K/V blocks and merges partial results by their log-sum-exp: S2O ranks
each segment's *whole* history before it attends to any of it and stops once the next tile in
that order adds almost nothing. A ring visits the history in arrival order, one block at a time,
so it could only rank and stop within each block: a different method, not the same result.

Layouts (``shard_bounds``): the sequence is cut into chunks of whole segments (the last chunk
takes the remainder; late chunks are empty when there are fewer segments than chunks).
``"contiguous"``: rank r holds chunk r of W. ``"zigzag"``: rank r holds chunks r and 2W-1-r of
2W, so that every rank gets an early, cheap chunk and a late, expensive one (causal attention
costs grow with the position). ``shard_sequence`` cuts a full tensor that way and
``gather_sequence`` puts shards back together.

Failures: every rank first checks its arguments and exchanges them (shapes, dtypes, layout,
config) with the others; a rank whose arguments are wrong, or that disagrees with the others,
makes every rank raise, so no rank is left waiting in a collective. A rank that dies or never
calls leaves the others in a collective until the process group's timeout
(``torch.distributed.init_process_group(timeout=...)``); the error then says so.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib

import torch
import torch.distributed as dist

from .attention import (
    QueryPiece,
    S2OStats,
    _check_arguments,
    _fallback_reason,
    _StageClock,
    announce_fallback,
    dense_piece,
    pieces_stats,
    positive_scale,
    run_pieces,
)
from .config import S2OConfig
from .layout import ceil_div
from .plan import Plan

LAYOUTS = ("contiguous", "zigzag")

# all_gather_into_tensor's new name (PyTorch 2.13 deprecates the old one).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def shard_bounds(
    length: int, world_size: int, layout: str, segment_size: int
) -> list[list[tuple[int, int]]]:
    """Per rank, the position ranges ``[begin, end)`` it holds, in the order its shard stores
    them: one range with ``"contiguous"``, two with ``"zigzag"`` (ranges may be empty)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    chunks = world_size if layout == "contiguous" else 2 * world_size
    chunk = ceil_div(ceil_div(length, segment_size), chunks) * segment_size
    bounds = [(min(c * chunk, length), min((c + 1) * chunk, length)) for c in range(chunks)]
    if layout == "contiguous":
        return [[bounds[r]] for r in range(world_size)]
    return [[bounds[r], bounds[chunks - 1 - r]] for r in range(world_size)]


def shard_sequence(
    tensor: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    layout: str = "contiguous",
    config: S2OConfig | None = None,
    dim: int = -2,
) -> torch.Tensor:
    """This rank's shard of ``tensor``, the whole sequence along ``dim`` (SDPA layout: -2), as
    ``context_parallel_attention`` with this ``layout`` and ``config`` expects it."""
    config = S2OConfig() if config is None else config
    rank, world_size = _rank_and_size(group)
    bounds = shard_bounds(tensor.shape[dim], world_size, layout, config.segment_size)[rank]
    return torch.cat([tensor.narrow(dim, begin, end - begin) for begin, end in bounds], dim=dim)


def gather_sequence(
    shard: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    layout: str = "contiguous",
    config: S2OConfig | None = None,
    dim: int = -2,
) -> torch.Tensor:
    """The whole sequence from every rank's ``shard`` (cut by :func:`shard_sequence`), on every
    rank; the shards' other dimensions must agree."""
    config = S2OConfig() if config is None else config
    _, world_size = _rank_and_size(group)
    dim = dim % shard.dim()
    lengths = _all_gather(
        torch.tensor([shard.shape[dim]], device=_collective_device(group)), group, "the lengths"
    )
    bounds = shard_bounds(int(lengths.sum()), world_size, layout, config.segment_size)
    _check_lengths([int(n) for n in lengths], bounds, layout, config, "shard")
    moved = shard.movedim(dim, -2)
    return _gather_positions(moved, bounds, group).movedim(-2, dim)


def context_parallel_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    layout: str = "contiguous",
    is_causal: bool = True,
    scale: float | None = None,
    config: S2OConfig | None = None,
    return_lse: bool = False,
    return_stats: bool = False,
):
    """s2o attention of a sequence sharded over the ranks of ``group`` (None: the default group).

    Every rank passes its own shard, cut by :func:`shard_sequence` with the same ``layout`` and
    ``config``: query ``[B, Hq, n, D]``, key/value ``[B, Hkv, n, D]`` of the same positions
    (Hq a multiple of Hkv: MHA, GQA, MQA). Returns the attention output of those positions
    ``[B, Hq, n, D]``; with ``return_lse`` also their log-sum-exp ``[B, Hq, n]`` fp32; with
    ``return_stats`` also an :class:`s2o.S2OStats` of this rank (density and tile counts of its
    pieces, times with a ``gather`` stage; the error estimate is the whole call's).

    Equal to ``s2o.attention(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=True,
    config=config)`` on the whole sequence, at the rows of this shard, including its dense
    fallbacks (decided by the whole sequence's length). Every rank of the group must call it.
    """
    config = S2OConfig() if config is None else config
    rank, world_size = _rank_and_size(group)
    device = _collective_device(group)
    problem = _local_problem(query, key, value, layout, config)
    meta = _metadata(query, key, value, layout, is_causal, scale, config, problem)
    table = _all_gather(meta[None].to(device), group, "the argument check")[:, 0].cpu()
    _check_agreement(table, rank, problem)
    clock = _StageClock(query.device) if return_stats else None

    lengths = [int(n) for n in table[:, _FIELDS.index("query rows")]]
    total = sum(lengths)
    bounds = shard_bounds(total, world_size, layout, config.segment_size)
    _check_lengths(lengths, bounds, layout, config, "query")
    # The same decision on every rank: the whole sequence's lengths, arguments that agree.
    fallback = _fallback_reason(
        query, key, value, None, 0.0, config, num_queries=total, num_keys=total
    )
    key, value = (_gather_positions(t, bounds, group) for t in (key, value))  # [B, Hkv, N, D]
    if clock is not None:
        clock.lap("gather")
    query, scale = positive_scale(query, scale)
    pieces = _query_pieces(query, key, value, bounds[rank], config, is_causal, scale)
    batch, q_heads, _, head_dim = query.shape
    call_shape = (batch, q_heads, total, head_dim)

    if fallback is not None:
        what = "context_parallel_attention would fall back to dense attention"
        reason = announce_fallback(fallback, config, what)
        dense = [dense_piece(p) for p in pieces]
        outs, lses = [d[0] for d in dense], [d[1] for d in dense]
        stats = S2OStats(path="dense", fallback_reason=reason)
    else:
        call_plan = Plan.for_call(config, call_shape, key.shape, is_causal=is_causal, scale=scale)
        result = run_pieces(
            pieces,
            query_shape=call_shape,
            kv_chunks=call_plan.kv_chunks,
            config=config,
            device=query.device,
            clock=clock,
            all_reduce=lambda tensor: _all_reduce(tensor, group),
        )
        outs, lses = result.outs, result.lses
        stats = pieces_stats(pieces, result) if return_stats else None

    out = torch.cat(outs, dim=2) if outs else query.new_empty(query.shape)
    returned = [out]
    if return_lse:
        lse = (
            torch.cat(lses, dim=2)
            if lses
            else query.new_empty(query.shape[:3], dtype=torch.float32)
        )
        returned.append(lse)
    if return_stats:
        stats.time_ms = clock.times
        returned.append(stats)
    return returned[0] if len(returned) == 1 else tuple(returned)


# The fields every rank sends before anything else (one int64 each): its rows, what must agree
# across the ranks, and whether its own arguments have a problem.
_FIELDS = (
    "query rows",
    "batch",
    "query heads",
    "key heads",
    "head dim",
    "dtype",
    "device type",
    "layout",
    "is_causal",
    "scale",
    "config",
    "requires grad",
    "problem",
)
_AGREED = ("batch", "query heads", "key heads", "head dim", "dtype", "device type", "layout",
           "is_causal", "scale", "config", "requires grad")  # fmt: skip


def _rank_and_size(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "s2o.distributed needs torch.distributed initialised first "
            "(torch.distributed.init_process_group)"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def _collective_device(group) -> torch.device:
    """Where the group's collectives take their tensors: the current GPU for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _local_problem(query, key, value, layout, config) -> str | None:
    """What is wrong with this rank's own arguments (None: nothing), as the error will say it."""
    if not isinstance(config, S2OConfig):
        return f"config must be an s2o.S2OConfig or None, got {type(config).__name__}"
    if layout not in LAYOUTS:
        return f"layout must be one of {LAYOUTS}, got {layout!r}"
    try:
        _check_arguments(query, key, value, 0.0, None, True)
    except (TypeError, ValueError) as error:
        return str(error)
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if tensor.dim() != 4:
            return f"{name} must be [B, H, n, D], got shape {tuple(tensor.shape)}"
    if key.shape != value.shape:
        return (
            f"key and value must have the same shape, got {tuple(key.shape)} and "
            f"{tuple(value.shape)}"
        )
    if query.shape[0] != key.shape[0] or query.shape[2] != key.shape[2]:
        return (
            "query and key must hold the same batch and positions (the rank's shard of both), "
            f"got query {tuple(query.shape)} and key {tuple(key.shape)}"
        )
    if key.shape[1] == 0 or query.shape[1] % key.shape[1]:
        return (
            "the query head count must be a multiple of the key head count, got query "
            f"{tuple(query.shape)} and key {tuple(key.shape)}"
        )
    if not query.dtype == key.dtype == value.dtype:
        return f"query, key and value dtypes differ: {query.dtype}, {key.dtype}, {value.dtype}"
    if not query.device == key.device == value.device:
        return f"query, key and value devices differ: {query.device}, {key.device}, {value.device}"
    return None


def _metadata(query, key, value, layout, is_causal, scale, config, problem):
    def code(value) -> int:  # a stable 31-bit code of anything with a stable repr
        return zlib.crc32(repr(value).encode()) >> 1

    if problem is not None:
        values = {name: -1 for name in _FIELDS}
        values["problem"] = 1
    else:
        scale_bits = struct.unpack("<q", struct.pack("<d", -0.0 if scale is None else scale))[0]
        values = {
            "query rows": query.shape[2],
            "batch": query.shape[0],
            "query heads": query.shape[1],
            "key heads": key.shape[1],
            "head dim": query.shape[3],
            "dtype": code(query.dtype),
            "device type": code(query.device.type),
            "layout": LAYOUTS.index(layout),
            "is_causal": int(bool(is_causal)),
            "scale": scale_bits,
            "config": code(
                dataclasses.astuple(dataclasses.replace(config, strict=config.is_strict()))
            ),
            "requires grad": int(
                torch.is_grad_enabled()
                and (query.requires_grad or key.requires_grad or value.requires_grad)
            ),
            "problem": 0,
        }
    return torch.tensor([values[name] for name in _FIELDS], dtype=torch.int64)


def _check_agreement(table: torch.Tensor, rank: int, problem: str | None) -> None:
    """Raises on every rank when any rank's arguments are wrong or the ranks disagree."""
    failed = [r for r in range(table.shape[0]) if table[r, _FIELDS.index("problem")]]
    if problem is not None:
        raise ValueError(f"context_parallel_attention (rank {rank}): {problem}")
    if failed:
        raise ValueError(
            f"context_parallel_attention: rank(s) {failed} rejected their arguments (their "
            "error says why); every rank raises"
        )
    for name in _AGREED:
        column = table[:, _FIELDS.index(name)].tolist()
        if len(set(column)) > 1:
            shown = ", ".join(f"rank {r}: {v}" for r, v in enumerate(column))
            raise ValueError(
                f"context_parallel_attention: the ranks disagree on {name} ({shown}); every rank "
                "must pass the same head counts, head dim, dtype, device type, layout, is_causal, "
                "scale and config, with gradients on or off on all"
            )


def _check_lengths(lengths, bounds, layout, config, what) -> None:
    expected = [sum(end - begin for begin, end in b) for b in bounds]
    if lengths != expected:
        raise ValueError(
            f"context_parallel_attention: the ranks' {what} shards hold {lengths} positions; a "
            f"sequence of {sum(lengths)} cut by layout={layout!r} at segment_size="
            f"{config.segment_size} gives {expected} (cut it with s2o.distributed.shard_sequence)"
        )


def _collective_error(what: str, error: Exception) -> RuntimeError:
    return RuntimeError(
        f"s2o.distributed: {what} with the other ranks failed (a rank failed, exited, or did not "
        f"call within the process group's timeout): {error}"
    )


def _all_gather(tensor: torch.Tensor, group, what: str) -> torch.Tensor:
    """[W, *tensor.shape]: every rank's ``tensor`` (which has a leading dim)."""
    world_size = dist.get_world_size(group)
    gathered = tensor.new_empty((world_size * tensor.shape[0], *tensor.shape[1:]))
    try:
        _all_gather_single(gathered, tensor.contiguous(), group=group)
    except RuntimeError as error:
        raise _collective_error(f"exchanging {what}", error) from error
    return gathered.unflatten(0, (world_size, tensor.shape[0]))


def _all_reduce(tensor: torch.Tensor, group) -> None:
    try:
        dist.all_reduce(tensor, group=group)
    except RuntimeError as error:
        raise _collective_error("summing the error estimate", error) from error


def _gather_positions(shard: torch.Tensor, bounds, group) -> torch.Tensor:
    """``shard`` [..., n, D] of every rank, put at its positions: [..., N, D]."""
    if len(bounds) == 1:  # one rank: its shard is the sequence, in order
        return shard
    widest = max(sum(end - begin for begin, end in b) for b in bounds)
    padded = torch.nn.functional.pad(shard, (0, 0, 0, widest - shard.shape[-2]))
    gathered = _all_gather(padded, group, "K/V")
    length = max(end for ranges in bounds for _, end in ranges)
    full = shard.new_empty((*shard.shape[:-2], length, shard.shape[-1]))
    for r, ranges in enumerate(bounds):
        offset = 0
        for begin, end in ranges:
            full[..., begin:end, :] = gathered[r][..., offset : offset + end - begin, :]
            offset += end - begin
    return full


def _query_pieces(query, key, value, ranges, config, is_causal, scale) -> list[QueryPiece]:
    """This rank's query rows, one piece per non-empty range, against all keys, the first row at
    position ``begin`` (causal: it sees the keys before its position, as in the whole call; the
    keys past the piece's rows still set the importance scores' quantisation bounds, as they do
    for the whole)."""
    pieces, offset = [], 0
    for begin, end in ranges:
        if end == begin:
            continue
        rows = query[:, :, offset : offset + end - begin]
        offset += end - begin
        plan = Plan.for_call(
            config, rows.shape, key.shape, is_causal=is_causal, scale=scale,
            q_offset=begin if is_causal else 0,
        )  # fmt: skip
        pieces.append(QueryPiece(rows, key, value, plan, first_row=begin))
    return pieces
