import pytest
import torch

import s2o
from s2o import reference
from s2o.layout import SegmentLayout

from .conftest import CPU_CASES, make_qkv


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("order_per_kv_head", [True, False], ids=["kvhead", "qhead"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("variance_weight", [0.0, 0.3], ids=["mean", "variance"])
def test_matches_reference(case, order_per_kv_head, dtype, contiguous, variance_weight):
    q, k, _ = make_qkv(case, dtype, contiguous=contiguous)
    kwargs = dict(
        segment_size=case.segment_size,
        q_offset=case.q_offset,
        is_causal=case.is_causal,
        order_per_kv_head=order_per_kv_head,
        variance_weight=variance_weight,
    )
    reps, scores = s2o.estimate_importance(q, k, **kwargs)
    ref_reps, ref_scores = reference.estimate_importance(q, k, **kwargs)

    layout = SegmentLayout(
        case.num_queries, case.num_keys, case.segment_size, case.q_offset, case.is_causal
    )
    heads = case.kv_heads if order_per_kv_head else case.q_heads
    assert reps.shape == (case.batch, heads, layout.num_segments, case.head_dim)
    assert scores.shape == (case.batch, heads, layout.total_history)
    assert reps.dtype == scores.dtype == torch.float32
    torch.testing.assert_close(reps, ref_reps, atol=1e-6, rtol=1e-5)
    # A score sums D products: allow fp32 rounding of that sum.
    magnitude = max(1.0, float(ref_scores.abs().max())) if ref_scores.numel() else 1.0
    atol = 1e-6 * case.head_dim * magnitude
    torch.testing.assert_close(scores, ref_scores, atol=atol, rtol=1e-5)


def test_variance_term_ranks_up_keys_the_rows_disagree_on():
    """Two keys with the same dot product with the mean query: the one along a dimension where the
    segment's rows spread gets the higher score, by variance_weight * var * k^2."""
    q = torch.zeros(1, 1, 4, 2)
    q[0, 0, :, 0] = torch.tensor([1.0, -1.0, 1.0, -1.0])  # mean 0, variance 1 in dimension 0
    q[0, 0, :, 1] = 0.5  # mean 0.5, variance 0 in dimension 1
    k = torch.zeros(1, 1, 8, 2)
    k[0, 0, 0] = torch.tensor([2.0, 1.0])  # r . k = 0.5, spread term 4
    k[0, 0, 1] = torch.tensor([0.0, 1.0])  # r . k = 0.5, spread term 0
    kwargs = dict(segment_size=4, q_offset=4, is_causal=True)  # one segment, history: 4 keys
    _, plain = s2o.estimate_importance(q, k[:, :, :8], **kwargs)
    _, spread = s2o.estimate_importance(q, k[:, :, :8], variance_weight=0.25, **kwargs)
    assert plain[0, 0, 0] == plain[0, 0, 1] == 0.5
    assert spread[0, 0, 0] == 0.5 + 0.25 * 4 and spread[0, 0, 1] == 0.5


def test_history_layout_is_ragged_by_segment():
    # Segment s of a causal top-left layout sees s * segment_size keys; the total is their sum.
    layout = SegmentLayout(num_queries=100, num_keys=100, segment_size=32)
    assert [layout.history_length(s) for s in range(layout.num_segments)] == [0, 32, 64, 96]
    assert layout.total_history == 192
    bottom_right = SegmentLayout(num_queries=50, num_keys=120, segment_size=32, q_offset=70)
    assert [bottom_right.history_length(s) for s in range(2)] == [70, 102]
    assert SegmentLayout(10, 7, 4, is_causal=False).total_history == 3 * 7
    # Queries past the end of the keys (top-left with Nq > Nk) see every key as history.
    assert SegmentLayout(num_queries=90, num_keys=40, segment_size=32).history_length(2) == 40


def test_scores_depend_on_segment_queries_only():
    # Changing queries of segment 1 changes only segment 1's representative and scores.
    case = CPU_CASES[0]
    q, k, _ = make_qkv(case)
    kwargs = dict(segment_size=case.segment_size, order_per_kv_head=False)
    reps, scores = s2o.estimate_importance(q, k, **kwargs)
    q2 = q.clone()
    q2[:, :, case.segment_size : 2 * case.segment_size] += 1.0
    reps2, scores2 = s2o.estimate_importance(q2, k, **kwargs)
    changed = (reps2 != reps).any(dim=-1)[0, 0]
    assert changed.tolist() == [s == 1 for s in range(reps.shape[2])]
    layout = SegmentLayout(case.num_queries, case.num_keys, case.segment_size)
    seg1 = slice(layout.history_offset(1), layout.history_offset(2))
    assert not torch.equal(scores2[..., seg1], scores[..., seg1])
    assert torch.equal(scores2[..., seg1.stop :], scores[..., seg1.stop :])
