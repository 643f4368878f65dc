import pytest
import torch

from s2o import reference
from s2o.layout import SegmentLayout
from s2o.limits import SCORE_LEVELS
from s2o.plan import softmax_scale

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
    # The kernels and the reference quantise the same values, but the reference's means may
    # differ in the last bit and so round a representative's entry to the neighbouring level: allow
    # a few levels of each term (|k~| <= the levels, so one level of r~ moves a score by at most
    # the term's largest |r[d] m[d]| / levels, which |q|max |k|max bounds).
    q_max, k_max = float(q.abs().max()), float(k.abs().max())
    weight = score_variance * softmax_scale(case.head_dim, plan.scale)
    mean_level = q_max * k_max / SCORE_LEVELS
    variance_level = weight * (2 * q_max * k_max) ** 2 / SCORE_LEVELS
    atol = 3 * (mean_level + variance_level)
    torch.testing.assert_close(scores, ref_scores, atol=atol, rtol=0)


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


_CPU_SCORES_SCRIPT = """
import sys, torch
from s2o.layout import SegmentLayout
from tests.conftest import make_plan
torch.manual_seed(0)
q, k = torch.randn(1, 4, 333, 37) * 3, torch.randn(1, 2, 333, 37)  # odd D: a padded pair
plan = make_plan(SegmentLayout(333, 333, 64), order_per_kv_head=False, score_variance=0.5)
torch.save(plan.estimate(q, k), sys.argv[1])
"""


def test_cpu_vector_products_equal_the_portable_loops(tmp_path):
    """The CPU scores' integer products run on AVX-512 where the CPU has it; S2O_CPU_AVX512=0
    forces the portable loops. Integers are exact: the scores are the same bits (a process each:
    the switch is read once)."""
    import os
    import subprocess
    import sys

    results = {}
    for setting in ("1", "0"):
        path = tmp_path / f"scores{setting}.pt"
        env = {**os.environ, "S2O_CPU_AVX512": setting}
        subprocess.run([sys.executable, "-c", _CPU_SCORES_SCRIPT, str(path)], env=env, check=True)
        results[setting] = torch.load(path)
    assert results["1"].numel() > 0
    assert torch.equal(results["1"], results["0"])
