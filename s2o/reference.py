"""Pure-PyTorch implementation of the S2O pipeline (fp32, the scores as the kernels' exact
integer products of quantised vectors): readable, slow, the tests' yardstick.

It follows the same semantics as the C++ ops (see s2o/ops.py and csrc/cpu/): segments of query
rows score their history keys against the mean query, rank them by falling score, and attend to
the local keys densely and to the ranked history tile by tile until a tile adds less than
``threshold`` of any row's softmax mass. Each function takes the arguments of its op as a
:class:`s2o.plan.Plan`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .layout import ceil_div
from .limits import SCORE_LEVELS
from .plan import Plan, softmax_scale


def _kv_for_query_heads(t: torch.Tensor, group: int) -> torch.Tensor:
    return t.repeat_interleave(group, dim=1) if group > 1 else t


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    is_causal: bool = True,
    q_offset: int = 0,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention in fp32 with query row i at position i + q_offset (GQA by head groups).

    Returns ``(out [B, Hq, Nq, D] fp32, lse [B, Hq, Nq] fp32)``.
    """
    group = query.shape[1] // key.shape[1]
    q, k, v = (
        query.float(),
        _kv_for_query_heads(key.float(), group),
        _kv_for_query_heads(value.float(), group),
    )
    scale = softmax_scale(q.shape[-1], scale)
    logits = (q @ k.transpose(-1, -2)) * scale
    if is_causal:
        pos = torch.arange(q.shape[2], device=q.device)[:, None] + q_offset
        logits = logits.masked_fill(
            torch.arange(k.shape[2], device=q.device)[None, :] > pos, float("-inf")
        )
    lse = torch.logsumexp(logits, dim=-1)
    return torch.softmax(logits, dim=-1) @ v, lse


def _quantize(x: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """csrc/include/s2o/quantized_scores.h's quantize(x, quantization_gain(bound)), as float64
    integers."""
    gain = torch.where(bound > 0, SCORE_LEVELS / bound, torch.zeros_like(bound))
    return torch.round((x * gain).clamp(-SCORE_LEVELS, SCORE_LEVELS)).double()


def _segment_scores(vector: torch.Tensor, key_bound: torch.Tensor, keys: torch.Tensor):
    """One term of the quantised score (quantized_scores.h): ``vector [..., D]`` scaled by the
    keys' bounds and quantised against its own largest entry, times the quantised ``keys [..., n,
    D]``, exactly (float64 holds the integer sums), times the step: ``[..., n]`` fp32."""
    scaled = vector * key_bound
    largest = scaled.abs().amax(dim=-1, keepdim=True)
    products = torch.einsum("...d,...nd->...n", _quantize(scaled, largest), keys)
    return products.float() * (largest / (SCORE_LEVELS * SCORE_LEVELS))


def estimate_importance(query: torch.Tensor, key: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Per segment, the representative (mean query row) dotted with the history keys, plus
    ``score_variance * scale * sum_d var[d] * k[d]^2`` with ``var`` the per-dimension variance of
    the segment's rows (pooled like the mean; see ``s2o.ops.estimate_importance``), as the kernels
    compute them: integer products of quantised vectors (csrc/include/s2o/quantized_scores.h).

    Returns scores ``[B, H_ord, T]`` fp32.
    """
    batch, q_heads, num_queries, head_dim = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    layout, order_per_kv_head = plan.layout, plan.order_per_kv_head
    variance_weight = plan.score_variance * softmax_scale(head_dim, plan.scale)
    q = query.float()
    # The keys' per-dimension bounds (over all keys) and quantised values, per KV head.
    k = key.float()
    bound = k.abs().amax(dim=2, keepdim=True) if k.shape[2] else k.new_zeros(k[:, :, :1].shape)
    squared_bound = bound * bound
    mean_keys = _quantize(k, bound)
    variance_keys = _quantize(k * k, squared_bound)
    if not order_per_kv_head:
        mean_keys, variance_keys, bound, squared_bound = (
            _kv_for_query_heads(t, group) for t in (mean_keys, variance_keys, bound, squared_bound)
        )
    scores = []
    for s in range(layout.num_segments):
        rows = q[:, :, layout.segment_rows(s)]
        if order_per_kv_head:
            rows = rows.reshape(batch, kv_heads, -1, head_dim)
        rep = rows.mean(dim=2)
        history = layout.history_length(s)
        score = _segment_scores(rep, bound[:, :, 0], mean_keys[:, :, :history])
        if variance_weight > 0:
            variance = variance_weight * (rows - rep.unsqueeze(2)).square().mean(dim=2)
            score = score + _segment_scores(
                variance, squared_bound[:, :, 0], variance_keys[:, :, :history]
            )
        scores.append(score)
    return torch.cat(scores, dim=-1)


def rank_keys(scores: torch.Tensor, rank_bits: int = 32) -> torch.Tensor:
    """The ranking key of csrc/include/s2o/ranking.h as int64: an order-preserving map of the fp32
    score (NaN highest, -0 == +0), cut to its top rank_bits bits."""
    bits = scores.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    key = torch.where(bits >= 0x80000000, (~bits) & 0xFFFFFFFF, bits | 0x80000000)
    key = torch.where(scores == 0, torch.full_like(key, 0x80000000), key)
    key = torch.where(torch.isnan(scores), torch.full_like(key, 0xFFFFFFFF), key)
    return key >> (32 - rank_bits)


def permute_indices(scores: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Per segment, the history key indices by falling rank key, ties by lower index (int32).
    With ``ranked_keys > 0`` only the keys at or above the ``ranked_keys``-th largest rank key are
    ranked; the others follow in index order."""
    layout, rank_bits, ranked_keys = plan.layout, plan.rank_bits, plan.ranked_keys
    keys = rank_keys(scores, rank_bits)
    out = torch.empty(scores.shape, dtype=torch.int32, device=scores.device)
    for s in range(layout.num_segments):
        begin, length = layout.history_offset(s), layout.history_length(s)
        seg = keys[..., begin : begin + length]
        order = torch.argsort(-seg, dim=-1, stable=True)
        if 0 < ranked_keys < length:
            head_min = torch.gather(seg, -1, order[..., ranked_keys - 1 : ranked_keys])
            # The full order puts the tail (keys below head_min) last; put its keys in index
            # order: sorted with the head's entries as -1, they fill the same suffix.
            in_tail = torch.gather(seg, -1, order) < head_min
            tail = torch.sort(torch.where(in_tail, order, -1), dim=-1).values
            order = torch.where(in_tail, tail, order)
        out[..., begin : begin + length] = order.to(torch.int32)
    return out


@dataclass
class SparseResult:
    out: torch.Tensor  # [B, Hq, Nq, D] fp32
    lse: torch.Tensor  # [B, Hq, Nq] fp32
    tile_counts: torch.Tensor  # [B, H_unit, num_query_tiles] int32
    # [B, H_unit, num_query_tiles]: smallest |max_ratio / threshold - 1| over the unit's stop
    # decisions (inf when threshold is 0). A unit whose margin is tiny may stop one tile earlier or
    # later in another implementation because of rounding.
    decision_margin: torch.Tensor


class _OnlineSoftmax:
    """Running max, mass and unnormalised output of the rows of one work unit."""

    def __init__(self, scaled_queries: torch.Tensor, positions: torch.Tensor):
        rows, dev = scaled_queries.shape[0], scaled_queries.device
        self.q, self.pos = scaled_queries, positions  # [R, D], [R]
        self.max = torch.full((rows,), float("-inf"), device=dev)
        self.mass = torch.zeros(rows, device=dev)
        self.acc = torch.zeros(rows, scaled_queries.shape[1], device=dev)

    def fold(self, keys, values, key_pos: torch.Tensor, masked: bool) -> float:
        """Adds the keys at key_pos; returns max over rows of (tile mass / row mass)."""
        s = self.q @ keys[key_pos].T
        if masked:
            s = s.masked_fill(key_pos[None, :] > self.pos[:, None], float("-inf"))
        new_max = torch.fmax(self.max, s.max(dim=1).values)
        frame = torch.where(new_max == float("-inf"), 0.0, new_max)
        alpha = torch.exp(self.max - frame)
        p = torch.exp(s - frame[:, None])
        gain = p.sum(dim=1)
        self.max, self.mass = new_max, self.mass * alpha + gain
        self.acc = self.acc * alpha[:, None] + p @ values[key_pos]
        ratio = torch.where(self.mass > 0, gain / self.mass, 0.0)
        return float(torch.nan_to_num(ratio, nan=0.0).max())

    def output(self) -> torch.Tensor:
        return self.acc / self.mass[:, None]

    def lse(self) -> torch.Tensor:
        return self.max + torch.log(self.mass)


def stop_threshold(threshold: float, tail_threshold: float | None, remaining_tiles: int) -> float:
    """The stop rule's bar for a history tile with ``remaining_tiles`` after it:
    ``min(threshold, tail_threshold / remaining_tiles)``, the quotient in fp32 as the kernels
    compute it (csrc/include/s2o/stop_rule.h)."""
    if tail_threshold is None or remaining_tiles <= 0:
        return threshold
    tail = torch.tensor(tail_threshold, dtype=torch.float32)
    return min(threshold, float(tail / float(remaining_tiles)))


def sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    indices: torch.Tensor,
    plan: Plan,
    unit_threshold: torch.Tensor | None = None,
) -> SparseResult:
    """Early-stopping sparse attention, one work unit at a time (see s2o.ops.sparse_attention)."""
    batch, q_heads, num_queries, head_dim = query.shape
    kv_heads, num_keys = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    layout, block_m, block_n, q_offset = (
        plan.layout,
        plan.block_m,
        plan.block_n,
        plan.layout.q_offset,
    )
    scale = softmax_scale(head_dim, plan.scale)
    if plan.group_units and not plan.order_per_kv_head:
        raise ValueError("group_units needs order_per_kv_head")
    unit_heads = group if plan.group_units else 1
    units = q_heads // unit_heads
    num_tiles = ceil_div(num_queries, block_m)
    q, k, v = query.float(), key.float(), value.float()

    dev = query.device
    out = torch.zeros(batch, q_heads, num_queries, head_dim, device=dev)
    lse = torch.zeros(batch, q_heads, num_queries, device=dev)
    counts = torch.zeros(batch, units, num_tiles, dtype=torch.int32)
    margins = torch.full((batch, units, num_tiles), math.inf)

    for b in range(batch):
        for h in range(units):
            heads = list(range(h * unit_heads, (h + 1) * unit_heads))
            kv_head = heads[0] // group
            list_head = kv_head if plan.order_per_kv_head else heads[0]
            keys, values = k[b, kv_head], v[b, kv_head]
            head_threshold = (
                plan.threshold if unit_threshold is None else float(unit_threshold[b, h])
            )
            if head_threshold < 0:  # skipped: nothing computed or written
                continue
            for t in range(num_tiles):
                slots = torch.arange(t * block_m, min((t + 1) * block_m, num_queries), device=dev)
                segment = int(slots[0]) // layout.segment_size
                rows = slots.expand(unit_heads, -1)  # [unit_heads, tile rows]
                head_index = torch.tensor(heads, device=dev)[:, None].expand_as(rows)
                unit = _OnlineSoftmax(
                    q[b, head_index, rows].reshape(-1, head_dim) * scale, rows.flatten() + q_offset
                )
                tiles = 0
                if layout.is_causal:
                    local_end = min(int(rows.max()) + q_offset + 1, num_keys)
                    for k0 in range(layout.segment_start(segment), local_end, block_n):
                        key_pos = torch.arange(k0, min(k0 + block_n, local_end), device=dev)
                        unit.fold(keys, values, key_pos, masked=True)
                        tiles += 1
                history = layout.history_length(segment)
                offset = layout.history_offset(segment)
                ranked = indices[b, list_head, offset : offset + history].long()
                history_tiles = ceil_div(history, block_n)
                quiet = 0
                for t0 in range(0, history, block_n):
                    max_ratio = unit.fold(keys, values, ranked[t0 : t0 + block_n], masked=False)
                    tiles += 1
                    bar = stop_threshold(
                        head_threshold, plan.tail_threshold, history_tiles - t0 // block_n - 1
                    )
                    if bar > 0:
                        margins[b, h, t] = min(margins[b, h, t], abs(max_ratio / bar - 1))
                    quiet = quiet + 1 if max_ratio < bar else 0
                    if quiet >= plan.patience:
                        break
                counts[b, h, t] = tiles
                out[b, head_index, rows] = unit.output().reshape(*rows.shape, head_dim)
                lse[b, head_index, rows] = unit.lse().reshape(rows.shape)
    return SparseResult(out, lse, counts, margins)
