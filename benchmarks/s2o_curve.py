"""s2o's error-vs-density points on an input: a threshold sweep through s2o.attention, or with
keys scored in Python by alternative representatives (the ablations)."""

from __future__ import annotations

import math

import torch

import s2o
from benchmarks import baselines
from benchmarks.common import (
    benchmark_config,
)
from benchmarks.inputs import Inputs
from s2o.layout import SegmentLayout
from s2o.plan import Plan, softmax_scale

DEFAULT_THRESHOLD = s2o.S2OConfig().threshold


def _squared_error_per_head(out: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Sum of squared errors per (batch, head), flattened batch-major: [B * Hq] fp64 (head by head
    to bound memory)."""
    batch, heads = out.shape[:2]
    squared = torch.empty(batch, heads, dtype=torch.float64)
    for h in range(heads):
        diff = out[:, h].float() - reference[:, h]
        squared[:, h] = diff.square().sum(dim=(1, 2)).double().cpu()
    return squared.flatten()


def _s2o_point(name, threshold, out, reference, reference_sq, tile_counts, tiles_per_head):
    """A curve point from s2o's output and tile_counts [B, H_ord, query tiles] (tiles_per_head:
    dense tiles of one ordering head)."""
    squared = _squared_error_per_head(out, reference)
    numel_per_head = out.shape[2] * out.shape[3]
    batch, ordering_heads = tile_counts.shape[:2]
    per_head = tile_counts.sum(dim=-1).double().cpu() / tiles_per_head  # [B, H_ord]
    per_head = per_head.repeat_interleave(out.shape[1] // ordering_heads, dim=1).flatten()
    total = float(squared.sum())
    return baselines.CurvePoint(
        method=name,
        knob="threshold",
        value=float(threshold),
        density=float(tile_counts.sum()) / (tiles_per_head * batch * ordering_heads),
        mse=total / (numel_per_head * squared.numel()),
        rel_l2=math.sqrt(total / reference_sq),
        head_mse=(squared / numel_per_head).tolist(),
        head_density=per_head.tolist(),
    )


def s2o_curve(
    inputs: Inputs,
    reference: torch.Tensor,
    thresholds,
    *,
    name: str = "s2o",
    representative: str | None = None,
    **config_overrides,
) -> list[baselines.CurvePoint]:
    """s2o's points for each threshold. Without ``representative``: ``s2o.attention`` (density
    from its stats); with one: keys scored in Python by alternative_scores, then the ranking and
    attention ops on those scores."""
    reference_sq = float(reference.double().square().sum())
    points = []
    indices = None  # with a representative: its ranking, the same at every threshold
    for threshold in thresholds:
        config = benchmark_config(threshold, sparse_pass_only=True, **config_overrides)
        if representative is None:
            out, stats = s2o.attention(
                inputs.query,
                inputs.key,
                inputs.value,
                is_causal=True,
                scale=inputs.scale,
                enable_gqa=True,
                config=config,
                return_stats=True,
            )
            tile_counts = stats.tile_counts
            tiles_per_head = stats.dense_tiles / (tile_counts.shape[0] * tile_counts.shape[1])
        else:
            out, tile_counts, tiles_per_head, indices = attention_with_representative(
                inputs, config, representative, indices
            )
        points.append(
            _s2o_point(name, threshold, out, reference, reference_sq, tile_counts, tiles_per_head)
        )
    return points


def alternative_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    config: s2o.S2OConfig,
    representative: str,
    scale: float,
    sub_segments: int = 4,
) -> torch.Tensor:
    """History-key scores of each segment with several representatives per ordering head,
    combined so that a key important to any of them ranks high: each representative's scores
    (times the softmax scale) minus their log-sum-exp over the history (the key's estimated log
    share of that representative's mass), then the max over representatives. A single
    representative's scores are the plain dot products, as the op computes them.

    ``representative``: ``mean`` (one plain mean: the op's ranking), ``head-max`` (the mean of
    each query head of the ordering unit), ``sub-mean-max`` (``sub_segments`` means of
    consecutive rows per query head), ``true-mass`` (no estimate: each key's true softmax mass
    summed over the segment's rows and heads, an oracle that bounds what any segment ranking
    can reach). With ``config.score_variance`` > 0 each representative's
    scores add the op's variance term over its own rows. Returns scores [B, H_ord, T] fp32 in
    the layout of ``s2o.estimate_importance``.
    """
    batch, q_heads, num_tokens, dim = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    order_per_kv_head = config.order_per_kv_head
    layout = SegmentLayout(num_tokens, num_tokens, config.segment_size, 0, True)
    heads_per_unit = group if order_per_kv_head else 1
    ordering_heads = q_heads // heads_per_unit
    keys = key.float() if order_per_kv_head else key.float().repeat_interleave(group, dim=1)
    variance_weight = config.score_variance * scale
    scores = torch.empty(batch, ordering_heads, layout.total_history, device=query.device)
    for s in range(layout.num_segments):
        history = layout.history_length(s)
        if history == 0:
            continue
        rows = query[:, :, layout.segment_rows(s)].float()  # [B, Hq, R, D]
        rows = rows.reshape(batch, ordering_heads, heads_per_unit, rows.shape[2], dim)
        offset = layout.history_offset(s)
        if representative == "true-mass":
            scores[:, :, offset : offset + history] = _true_history_mass(
                rows, keys, layout.segment_rows(s), history, scale
            )
            continue
        # Each representative's rows: parts of [B, H_ord, representatives, rows, D].
        if representative == "mean":
            parts = [rows.flatten(2, 3)[:, :, None]]
        elif representative == "head-max":
            parts = [rows]
        elif representative == "sub-mean-max":
            parts = torch.tensor_split(rows, min(sub_segments, rows.shape[3]), dim=3)
        else:
            raise ValueError(f"unknown representative {representative!r}")
        reps = torch.cat([p.mean(dim=3) for p in parts], dim=2)  # [B, H_ord, reps, D]
        history_keys = keys[:, :, :history]
        logits = torch.matmul(reps, history_keys.transpose(-1, -2))
        if variance_weight > 0:
            spreads = torch.cat([p.var(dim=3, unbiased=False) for p in parts], dim=2)
            logits += variance_weight * torch.matmul(
                spreads, history_keys.square().transpose(-1, -2)
            )
        # logits: [B, H_ord, representatives, history]
        if reps.shape[2] > 1:
            logits = logits * scale
            logits = (logits - logits.logsumexp(dim=-1, keepdim=True)).amax(dim=2)
        else:  # unscaled like the op's, so that rank_bits < 32 cuts the same bits
            logits = logits[:, :, 0]
        scores[:, :, offset : offset + history] = logits
    return scores


def _true_history_mass(rows, keys, row_range: range, history: int, scale: float):
    """Each history key's softmax mass summed over a segment's rows (causal, positions
    ``row_range``) and the heads of its ordering unit: rows [B, H_ord, heads, R, D], keys
    [B, H_ord, N, D] fp32 -> [B, H_ord, history]."""
    last = row_range.stop
    logits = torch.einsum("bhgrd,bhkd->bhgrk", rows, keys[:, :, :last]) * scale
    positions = torch.arange(row_range.start, last, device=rows.device)
    after_row = torch.arange(last, device=rows.device)[None, :] > positions[:, None]
    probs = torch.softmax(logits.masked_fill(after_row, float("-inf")), dim=-1)
    return probs[..., :history].sum(dim=(2, 3))


def attention_with_representative(
    inputs: Inputs, config: s2o.S2OConfig, representative: str, indices: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """s2o with Python-computed scores: (out [B, Hq, N, D], tile_counts [B, H_ord, query tiles],
    dense tiles of one ordering head, the ranked indices). ``indices``: a ranking computed
    earlier with the same ranking knobs, reused instead of scoring again."""
    q, k, v = inputs.query, inputs.key, inputs.value
    plan = Plan.for_call(config, q.shape, k.shape, is_causal=True, scale=inputs.scale)
    if indices is None:
        scale = softmax_scale(q.shape[-1], inputs.scale)
        indices = plan.permute(alternative_scores(q, k, config, representative, scale))
    out, _, tile_counts = plan.attend(q, k, v, indices)
    return out, tile_counts, plan.dense_tiles(), indices
