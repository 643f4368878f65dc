import pytest
import torch

from s2o import reference
from s2o.layout import SegmentLayout

from .conftest import CPU_CASES, case_plan, make_plan, make_qkv


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("order_per_kv_head", [True, False], ids=["kvhead", "qhead"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("score_variance", [0.0, 0.3], ids=["mean", "variance"])
def test_matches_reference(case, order_per_kv_head, dtype, contiguous, score_variance):
    q, k, _ = make_qkv(case, dtype, contiguous=contiguous)
    plan = case_plan(case, order_per_kv_head=order_per_kv_head, score_variance=score_variance)
    scores = plan.estimate(q, k)
    ref_scores = reference.estimate_importance(q, k, plan)

    heads = case.kv_heads if order_per_kv_head else case.q_heads
    assert scores.shape == (case.batch, heads, plan.layout.total_history)
    assert scores.dtype == torch.float32
    # A score sums D products: allow fp32 rounding of that sum.
    magnitude = max(1.0, float(ref_scores.abs().max())) if ref_scores.numel() else 1.0
    atol = 1e-6 * case.head_dim * magnitude
    torch.testing.assert_close(scores, ref_scores, atol=atol, rtol=1e-5)


def test_variance_term_ranks_up_keys_the_rows_disagree_on():
    """Two keys with the same dot product with the mean query: the one along a dimension where the
    segment's rows spread gets the higher score, by score_variance * scale * var * k^2."""
    q = torch.zeros(1, 1, 4, 2)
    q[0, 0, :, 0] = torch.tensor([1.0, -1.0, 1.0, -1.0])  # mean 0, variance 1 in dimension 0
    q[0, 0, :, 1] = 0.5  # mean 0.5, variance 0 in dimension 1
    k = torch.zeros(1, 1, 8, 2)
    k[0, 0, 0] = torch.tensor([2.0, 1.0])  # r . k = 0.5, spread term 4
    k[0, 0, 1] = torch.tensor([0.0, 1.0])  # r . k = 0.5, spread term 0
    layout = SegmentLayout(4, 8, segment_size=4, q_offset=4)  # one segment, history: 4 keys
    plain = make_plan(layout).estimate(q, k)
    spread = make_plan(layout, score_variance=0.25, scale=1.0).estimate(q, k)
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
    # Changing queries of segment 1 changes only segment 1's scores.
    case = CPU_CASES[0]
    q, k, _ = make_qkv(case)
    plan = case_plan(case, order_per_kv_head=False)
    scores = plan.estimate(q, k)
    q2 = q.clone()
    q2[:, :, case.segment_size : 2 * case.segment_size] += 1.0
    scores2 = plan.estimate(q2, k)
    layout = plan.layout
    seg1 = slice(layout.history_offset(1), layout.history_offset(2))
    assert torch.equal(scores2[..., : seg1.start], scores[..., : seg1.start])
    assert not torch.equal(scores2[..., seg1], scores[..., seg1])
    assert torch.equal(scores2[..., seg1.stop :], scores[..., seg1.stop :])
