"""The s2o ops (``torch.ops.s2o.*``): a typed wrapper for each, called by keyword, with its fake
kernel (for torch.compile and FakeTensor) beside it. Every output size depends only on the input
shapes and the arguments.

Shapes: query ``[B, Hq, Nq, D]``, key and value ``[B, Hkv, Nk, D]`` with ``Hq % Hkv == 0``.
``H_ord`` (ordering heads) is ``Hkv`` when ``order_per_kv_head`` else ``Hq``; ``T`` is the total
history length of all segments (:class:`s2o.layout.SegmentLayout`). The tuning arguments have
no defaults: those live in :class:`s2o.S2OConfig`, and :class:`s2o.plan.Plan` turns a config
into these arguments.
"""

from __future__ import annotations

import torch

from .layout import SegmentLayout, ceil_div


def estimate_importance(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    segment_size: int,
    q_offset: int,
    is_causal: bool,
    order_per_kv_head: bool,
    score_variance: float,
    scale: float | None = None,
) -> torch.Tensor:
    """Scores every history key of every query segment.

    The representative of a segment is the fp32 mean of its query rows (pooled over the G query
    heads of a KV group when ``order_per_kv_head``); a key's score is its dot product with it.
    With ``score_variance`` c > 0 the score adds ``c * scale * sum_d var[d] * k[d]^2``, ``var``
    the rows' per-dimension variance (``scale`` None: 1/sqrt(D)): c = 1/2 makes
    ``scale * score`` the Gaussian estimate of ``log sum_i exp(scale * q_i . k)``, what the
    segment's rows spend on the key.

    Both products are computed exactly on integers (``csrc/include/s2o/quantized_scores.h``):
    each key dimension quantised to ``limits.SCORE_LEVELS`` levels of its largest value over
    all keys, the representative (times those bounds) to as many of its own,
    and the variance term likewise, so the CPU and the GPU's
    int8 tensor cores give the same scores bit for bit, within about ``1 / (2 levels)`` of the
    exact products' range.

    Returns scores ``[B, H_ord, T]`` fp32.
    """
    return torch.ops.s2o.estimate_importance(
        query, key, segment_size, q_offset, is_causal, order_per_kv_head, score_variance, scale
    )


@torch.library.register_fake("s2o::estimate_importance")
def _(query, key, segment_size, q_offset, is_causal, order_per_kv_head, score_variance, scale):
    layout = SegmentLayout(query.shape[2], key.shape[2], segment_size, q_offset, is_causal)
    heads = key.shape[1] if order_per_kv_head else query.shape[1]
    return query.new_empty((query.shape[0], heads, layout.total_history), dtype=torch.float32)


def permute_indices(
    scores: torch.Tensor,
    *,
    num_queries: int,
    num_keys: int,
    segment_size: int,
    q_offset: int,
    is_causal: bool,
    rank_bits: int,
    ranked_keys: int,
) -> torch.Tensor:
    """Ranks each segment's history keys by falling score.

    Only the top ``rank_bits`` bits of an order-preserving integer map of the fp32 score take part
    (32: exact fp32 order); equal keys keep the lower key index first; NaN ranks first.
    ``ranked_keys > 0`` ranks only a prefix of each list: the ``ranked_keys`` best keys and every
    key tied with the last of them; the other keys follow in index order (on CUDA this needs
    ``rank_bits <= s2o.limits.COUNTING_RANK_BITS``). 0 ranks the whole history.

    Returns int32 ``[B, H_ord, T]``: per segment, a permutation of ``range(history_length)``.
    """
    return torch.ops.s2o.permute_indices(
        scores, num_queries, num_keys, segment_size, q_offset, is_causal, rank_bits, ranked_keys
    )


@torch.library.register_fake("s2o::permute_indices")
def _(scores, num_queries, num_keys, segment_size, q_offset, is_causal, rank_bits, ranked_keys):
    return scores.new_empty(scores.shape, dtype=torch.int32)


def sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    indices: torch.Tensor,
    *,
    segment_size: int,
    q_offset: int,
    is_causal: bool,
    order_per_kv_head: bool,
    group_units: bool,
    block_m: int,
    block_n: int,
    threshold: float,
    patience: int,
    tail_threshold: float | None,
    scale: float | None = None,
    unit_threshold: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Early-stopping sparse attention over ranked history tiles.

    A work unit is a query tile of ``block_m`` rows of one query head, or with ``group_units``
    of the G query heads of a KV group together (they share every K/V tile and stop together;
    needs ``order_per_kv_head``). It reads the ranked list of its KV head (``order_per_kv_head``)
    or of its query head. Per unit: the local keys (from the segment's first position to each
    row's own) densely with the causal mask, then the history in tiles of ``block_n`` keys taken
    from ``indices`` in order, stopping once ``max_row(tile mass / row mass) < threshold`` for
    ``patience`` tiles in a row. ``threshold=0`` visits every key: dense attention.

    ``tail_threshold``: the bar of history tile t is ``min(threshold, tail_threshold / R)``
    with R the history tiles after it: a tile also keeps the unit going when the tiles left,
    were each as heavy as it, could add ``tail_threshold`` of a row's mass (diffuse rows run on;
    rows whose tiles fall off fast stop where ``threshold`` stops them). None: off.

    ``scale``: the softmax scale (None: 1/sqrt(D)).

    ``unit_threshold``, fp32 ``[B, H_unit]`` on the query's device: per unit head, the threshold
    to use instead of ``threshold``; a negative entry skips that head's units (tile count 0, its
    ``out`` and ``lse`` rows are left unwritten). s2o.attention recomputes the heads over its
    error budget this way, without reading anything back to the host.

    Returns ``(out [B, Hq, Nq, D], lse [B, Hq, Nq] fp32, tile_counts [B, H_unit,
    ceil(Nq/block_m)] int32)``, ``H_unit = Hkv`` with ``group_units`` else ``Hq``.
    """
    return torch.ops.s2o.sparse_attention(
        query, key, value, indices, segment_size, q_offset, is_causal, order_per_kv_head,
        group_units, block_m, block_n, threshold, patience, tail_threshold, scale, unit_threshold,
    )  # fmt: skip


@torch.library.register_fake("s2o::sparse_attention")
def _(query, key, value, indices, segment_size, q_offset, is_causal, order_per_kv_head,
      group_units, block_m, block_n, threshold, patience, tail_threshold, scale=None,
      unit_threshold=None):  # fmt: skip
    batch, q_heads, num_queries, _ = query.shape
    units = key.shape[1] if group_units else q_heads
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    lse = query.new_empty((batch, q_heads, num_queries), dtype=torch.float32)
    counts = query.new_empty((batch, units, ceil_div(num_queries, block_m)), dtype=torch.int32)
    return out, lse, counts
