import pytest
import torch

import s2o
from s2o import reference
from s2o.layout import SegmentLayout

from .conftest import CPU_CASES, make_qkv


def _layout_kwargs(case):
    return dict(
        num_queries=case.num_queries,
        num_keys=case.num_keys,
        segment_size=case.segment_size,
        q_offset=case.q_offset,
        is_causal=case.is_causal,
    )


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("rank_bits", [32, 12, 3])
def test_matches_reference_and_is_a_ranked_permutation(case, rank_bits):
    q, k, _ = make_qkv(case)
    _, scores = s2o.estimate_importance(
        q, k, segment_size=case.segment_size, q_offset=case.q_offset, is_causal=case.is_causal
    )
    indices = s2o.permute_indices(scores, rank_bits=rank_bits, **_layout_kwargs(case))
    expected = reference.permute_indices(scores, rank_bits=rank_bits, **_layout_kwargs(case))
    assert indices.dtype == torch.int32 and indices.shape == scores.shape
    assert torch.equal(indices, expected)

    layout = SegmentLayout(**_layout_kwargs(case))
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


def test_ties_break_by_lower_index_and_special_values():
    # One segment of history 8 (Nq = 9 with segment_size 8: segment 1 sees keys 0..7).
    nan, inf = float("nan"), float("inf")
    history = torch.tensor([1.0, -0.0, 3.0, 1.0, nan, 0.0, -inf, 3.0])
    scores = history.view(1, 1, 8)
    indices = s2o.permute_indices(scores, num_queries=9, num_keys=9, segment_size=8)
    # NaN first, then 3.0 (keys 2, 7), 1.0 (0, 3), zeros of either sign as equals (1, 5), -inf.
    assert indices[0, 0].tolist() == [4, 2, 7, 0, 3, 1, 5, 6]


def test_coarse_rank_bits_merge_close_scores():
    scores = torch.tensor([1.0, 1.001, 1.002, 2.0]).view(1, 1, 4)
    kwargs = dict(num_queries=5, num_keys=5, segment_size=4)
    assert s2o.permute_indices(scores, rank_bits=32, **kwargs)[0, 0].tolist() == [3, 2, 1, 0]
    # With 12 bits (3 of mantissa) 1.0, 1.001 and 1.002 share a key: index order among them.
    assert s2o.permute_indices(scores, rank_bits=12, **kwargs)[0, 0].tolist() == [3, 0, 1, 2]


def test_deterministic():
    case = CPU_CASES[1]
    q, k, _ = make_qkv(case)
    _, scores = s2o.estimate_importance(q, k, segment_size=case.segment_size)
    first = s2o.permute_indices(scores, **_layout_kwargs(case))
    assert all(
        torch.equal(first, s2o.permute_indices(scores, **_layout_kwargs(case))) for _ in range(3)
    )
