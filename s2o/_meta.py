"""Fake (meta) kernels of the s2o ops, so torch.compile and FakeTensor can trace them.

Every output size depends only on input shapes and op arguments.
"""

from __future__ import annotations

import torch

from .layout import SegmentLayout, ceil_div


def _ordering_heads(query: torch.Tensor, key: torch.Tensor, order_per_kv_head: bool) -> int:
    return key.shape[1] if order_per_kv_head else query.shape[1]


@torch.library.register_fake("s2o::estimate_importance")
def _estimate_importance_fake(
    query, key, segment_size, q_offset, is_causal, order_per_kv_head, variance_weight=0.0
):
    layout = SegmentLayout(query.shape[2], key.shape[2], segment_size, q_offset, is_causal)
    heads = _ordering_heads(query, key, order_per_kv_head)
    batch, head_dim = query.shape[0], query.shape[3]
    reps = query.new_empty((batch, heads, layout.num_segments, head_dim), dtype=torch.float32)
    scores = query.new_empty((batch, heads, layout.total_history), dtype=torch.float32)
    return reps, scores


@torch.library.register_fake("s2o::permute_indices")
def _permute_indices_fake(
    scores, num_queries, num_keys, segment_size, q_offset, is_causal, rank_bits=32, rank_head=0
):
    return scores.new_empty(scores.shape, dtype=torch.int32)


@torch.library.register_fake("s2o::sparse_attention")
def _sparse_attention_fake(
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
    patience=1,
    scale=None,
    row_order=None,
    unit_threshold=None,
    tail_threshold=None,
):
    batch, q_heads, num_queries, _ = query.shape
    units = key.shape[1] if group_units else q_heads
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    lse = query.new_empty((batch, q_heads, num_queries), dtype=torch.float32)
    counts = query.new_empty((batch, units, ceil_div(num_queries, block_m)), dtype=torch.int32)
    return out, lse, counts
