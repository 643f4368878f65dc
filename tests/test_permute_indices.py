import pytest
import torch

from s2o import reference
from s2o.layout import SegmentLayout

from .conftest import CPU_CASES, case_plan, make_plan, make_qkv


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("rank_bits", [32, 12, 3])
def test_matches_reference_and_is_a_ranked_permutation(case, rank_bits):
    q, k, _ = make_qkv(case)
    plan = case_plan(case, rank_bits=rank_bits)
    scores = plan.estimate(q, k)
    indices = plan.permute(scores)
    assert indices.dtype == torch.int32 and indices.shape == scores.shape
    assert torch.equal(indices, reference.permute_indices(scores, plan))

    layout = plan.layout
    keys = reference.rank_keys(scores, rank_bits)
    for s in range(layout.num_segments):
        begin, length = layout.history_offset(s), layout.history_length(s)
        seg = indices[..., begin : begin + length].long()
        assert torch.equal(seg.sort(dim=-1).values, torch.arange(length).expand_as(seg))
        ranked = keys[..., begin : begin + length].gather(-1, seg)
        assert (ranked[..., :-1] >= ranked[..., 1:]).all()
        # Equal keys keep the lower index first.
        tie = ranked[..., :-1] == ranked[..., 1:]
        assert (seg[..., :-1][tie] < seg[..., 1:][tie]).all()


@pytest.mark.parametrize("case", CPU_CASES[:4], ids=lambda c: c.id)
@pytest.mark.parametrize("rank_bits", [32, 12, 3])
@pytest.mark.parametrize("ranked_keys", [1, 7, 64])
def test_ranked_keys_ranks_the_head_and_keeps_the_tail_in_index_order(case, rank_bits, ranked_keys):
    q, k, _ = make_qkv(case)
    plan = case_plan(case, rank_bits=rank_bits, ranked_keys=ranked_keys)
    scores = plan.estimate(q, k)
    indices = plan.permute(scores)
    assert torch.equal(indices, reference.permute_indices(scores, plan))
    full = plan.replace(ranked_keys=0).permute(scores)
    layout = plan.layout
    keys = reference.rank_keys(scores, rank_bits)
    for s in range(layout.num_segments):
        begin, length = layout.history_offset(s), layout.history_length(s)
        got, ranked = indices[..., begin : begin + length], full[..., begin : begin + length]
        if length <= ranked_keys:  # the whole list is the head
            assert torch.equal(got, ranked)
            continue
        seg_keys = keys[..., begin : begin + length]
        head_min = seg_keys.gather(-1, ranked[..., ranked_keys - 1 : ranked_keys].long())
        for row_got, row_ranked, row_keys, row_min in zip(
            got.reshape(-1, length),
            ranked.reshape(-1, length),
            seg_keys.reshape(-1, length),
            head_min.reshape(-1),
            strict=True,
        ):
            head = int((row_keys >= row_min).sum())
            assert head >= ranked_keys
            # The head as in the full ranking, then the other keys in index order.
            assert torch.equal(row_got[:head], row_ranked[:head])
            tail = torch.nonzero(row_keys < row_min).flatten().to(torch.int32)
            assert torch.equal(row_got[head:], tail)


def test_ranked_keys_covering_the_history_ranks_everything():
    plan = make_plan(SegmentLayout(300, 300, 32), rank_bits=12)
    scores = torch.randn(1, 2, plan.layout.total_history)
    full = plan.permute(scores)
    assert torch.equal(plan.replace(ranked_keys=288).permute(scores), full)  # longest history
    assert not torch.equal(plan.replace(ranked_keys=100).permute(scores), full)
    with pytest.raises(RuntimeError, match="ranked_keys must be >= 0"):
        plan.replace(ranked_keys=-1).permute(scores)


def test_ties_break_by_lower_index_and_special_values():
    # One segment of history 8 (Nq = 9 with segment_size 8: segment 1 sees keys 0..7).
    nan, inf = float("nan"), float("inf")
    history = torch.tensor([1.0, -0.0, 3.0, 1.0, nan, 0.0, -inf, 3.0])
    scores = history.view(1, 1, 8)
    indices = make_plan(SegmentLayout(9, 9, 8)).permute(scores)
    # NaN first, then 3.0 (keys 2, 7), 1.0 (0, 3), zeros of either sign as equals (1, 5), -inf.
    assert indices[0, 0].tolist() == [4, 2, 7, 0, 3, 1, 5, 6]


def test_ranked_keys_keeps_keys_tied_with_the_last_head_key():
    scores = torch.tensor([1.0, 5.0, 2.0, 5.0, 3.0, 2.0, 0.5, 2.0]).view(1, 1, 8)
    plan = make_plan(SegmentLayout(9, 9, 8), ranked_keys=4)
    # The 4th best key is a 2.0: all three 2.0 keys are in the head; 1.0 and 0.5 follow by index.
    assert plan.permute(scores)[0, 0].tolist() == [1, 3, 4, 2, 5, 7, 0, 6]


def test_coarse_rank_bits_merge_close_scores():
    scores = torch.tensor([1.0, 1.001, 1.002, 2.0]).view(1, 1, 4)
    plan = make_plan(SegmentLayout(5, 5, 4))
    assert plan.permute(scores)[0, 0].tolist() == [3, 2, 1, 0]
    # With 12 bits (3 of mantissa) 1.0, 1.001 and 1.002 share a key: index order among them.
    assert plan.replace(rank_bits=12).permute(scores)[0, 0].tolist() == [3, 0, 1, 2]


def test_deterministic():
    case = CPU_CASES[1]
    q, k, _ = make_qkv(case)
    plan = case_plan(case)
    scores = plan.estimate(q, k)
    first = plan.permute(scores)
    assert all(torch.equal(first, plan.permute(scores)) for _ in range(3))
