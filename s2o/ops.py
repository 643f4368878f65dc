"""Typed Python wrappers of the three s2o ops (``torch.ops.s2o.*``).

Shapes: query ``[B, Hq, Nq, D]``, key and value ``[B, Hkv, Nk, D]`` with ``Hq % Hkv == 0``.
``H_ord`` (ordering heads) is ``Hkv`` when ``order_per_kv_head`` else ``Hq``; ``T`` is the total
history length of all segments (:class:`s2o.layout.SegmentLayout`).
"""

from __future__ import annotations

import torch


def estimate_importance(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    segment_size: int,
    q_offset: int = 0,
    is_causal: bool = True,
    order_per_kv_head: bool = True,
    variance_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores every history key of every query segment.

    The representative of a segment is the fp32 mean of its query rows (pooled over the G query
    heads of a KV group when ``order_per_kv_head``); a key's score is its dot product with it.
    With ``variance_weight`` w > 0 the score adds ``w * sum_d var[d] * k[d]^2``, ``var`` the rows'
    per-dimension variance: w = scale / 2 makes ``scale * score`` the Gaussian estimate of
    ``log sum_i exp(scale * q_i . k)``, what the segment's rows spend on the key.

    Returns ``(representatives [B, H_ord, num_segments, D] fp32, scores [B, H_ord, T] fp32)``.
    """
    return torch.ops.s2o.estimate_importance(
        query, key, segment_size, q_offset, is_causal, order_per_kv_head, variance_weight
    )


def permute_indices(
    scores: torch.Tensor,
    *,
    num_queries: int,
    num_keys: int,
    segment_size: int,
    q_offset: int = 0,
    is_causal: bool = True,
    rank_bits: int = 32,
    rank_head: int = 0,
) -> torch.Tensor:
    """Ranks each segment's history keys by falling score.

    Only the top ``rank_bits`` bits of an order-preserving integer map of the fp32 score take part
    (32: exact fp32 order); equal keys keep the lower key index first; NaN ranks first.
    ``rank_head > 0`` ranks only the head of each list: the ``rank_head`` best keys and every key
    tied with the last of them; the other keys follow in index order (on CUDA this needs
    ``rank_bits <= 12``). 0 ranks the whole history.

    Returns int32 ``[B, H_ord, T]``: per segment, a permutation of ``range(history_length)``.
    """
    return torch.ops.s2o.permute_indices(
        scores, num_queries, num_keys, segment_size, q_offset, is_causal, rank_bits, rank_head
    )


def sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    indices: torch.Tensor,
    *,
    segment_size: int,
    q_offset: int = 0,
    is_causal: bool = True,
    order_per_kv_head: bool = True,
    group_units: bool = False,
    block_m: int = 128,
    block_n: int = 64,
    threshold: float = 0.0,
    patience: int = 1,
    scale: float | None = None,
    row_order: torch.Tensor | None = None,
    unit_threshold: torch.Tensor | None = None,
    tail_threshold: float | None = None,
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

    ``row_order`` (CPU only; the paper's query permutation), int32 ``[B, Hq, Nq]``: per query
    head, the order of each segment's rows; query tile t of a segment takes the rows
    ``row_order[..., t * block_m : (t + 1) * block_m]`` (a permutation of the segment's rows;
    see :func:`s2o.reference.guided_row_order`). Outputs stay in row order.

    ``unit_threshold``, fp32 ``[B, H_unit]`` on the query's device: per unit head, the threshold
    to use instead of ``threshold``; a negative entry skips that head's units (tile count 0, its
    ``out`` and ``lse`` rows are left unwritten). s2o.attention recomputes the heads over its
    error budget this way, without reading anything back to the host.

    Returns ``(out [B, Hq, Nq, D], lse [B, Hq, Nq] fp32, tile_counts [B, H_unit,
    ceil(Nq/block_m)] int32)``, ``H_unit = Hkv`` with ``group_units`` else ``Hq``.
    """
    return torch.ops.s2o.sparse_attention(
        query,
        key,
        value,
        indices,
        segment_size,
        q_offset,
        is_causal,
        order_per_kv_head,
        group_units,
        block_m,
        block_n,
        threshold,
        patience,
        scale,
        row_order,
        unit_threshold,
        tail_threshold,
    )
