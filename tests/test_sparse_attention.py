import math

import pytest
import torch
import torch.nn.functional as F

from s2o import data, reference

from .conftest import (
    CPU_CASES,
    MODES,
    TOLERANCES,
    Case,
    case_layout,
    case_plan,
    make_qkv,
    run_pipeline,
)

# Near-threshold decisions may go either way between implementations: tile counts are compared
# only for units whose every stop decision was farther than this (relative) from the threshold.
DECISION_MARGIN = 1e-3


def assert_matches_reference(q, k, v, indices, result, plan):
    """The op's result equals the reference's with the same plan."""
    out, lse, counts = result
    ref = reference.sparse_attention(q, k, v, indices, plan)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert counts.shape == ref.tile_counts.shape and counts.dtype == torch.int32
    clear = ref.decision_margin > DECISION_MARGIN
    assert clear.float().mean() > 0.9, "too many near-threshold units for a meaningful comparison"
    assert torch.equal(counts[clear], ref.tile_counts[clear])
    if bool(clear.all()):
        atol, rtol = TOLERANCES[q.dtype]
        torch.testing.assert_close(out.float(), ref.out, atol=atol, rtol=rtol)
        torch.testing.assert_close(lse, ref.lse, atol=1e-4, rtol=1e-5)
    return ref


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("threshold, tail", [(0.0, None), (0.02, None), (0.02, 0.05)])
def test_matches_reference(case, mode, threshold, tail):
    q, k, v = make_qkv(case, peaky=True)
    order_per_kv_head, group_units = MODES[mode]
    plan = case_plan(
        case,
        order_per_kv_head=order_per_kv_head,
        group_units=group_units,
        threshold=threshold,
        tail_threshold=tail,
    )
    _, indices, result = plan.run(q, k, v)
    assert_matches_reference(q, k, v, indices, result, plan)


def test_tail_threshold_runs_diffuse_rows_on():
    # Diffuse rows (no peaks): at threshold 0.05 alone a unit stops once its tiles add < 5%
    # each, missing much of the mass; the tail projection keeps it going until the tiles left
    # could add little. It never visits fewer tiles, visits more in (nearly) every unit that
    # stopped early, and 0 visits everything.
    case = Case(1, 2, 1, 2048, 2048, 32, 64, 64, 16)
    q, k, v = make_qkv(case)
    runs = {
        tail: run_pipeline(case, q, k, v, threshold=0.05, tail_threshold=tail)[2]
        for tail in (None, 0.05, 0.0)
    }
    _, _, (_, _, full) = run_pipeline(case, q, k, v)
    counts = {tail: result[2] for tail, result in runs.items()}
    stopped = counts[None] < full
    assert stopped.float().mean() > 0.5
    assert (counts[None] <= counts[0.05]).all() and (counts[0.05] <= full).all()
    assert (counts[None] < counts[0.05])[stopped].float().mean() > 0.9
    assert torch.equal(counts[0.0], full)
    dense = _sdpa_reference(case, q, k, v)

    def error(out):
        return float((out - dense).norm() / dense.norm())

    assert error(runs[0.05][0]) < 0.5 * error(runs[None][0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("case", CPU_CASES[1:4], ids=lambda c: c.id)
def test_low_precision_and_strided_inputs(case, dtype, contiguous):
    q, k, v = make_qkv(case, dtype, contiguous=contiguous, peaky=True)
    plan = case_plan(case, threshold=0.02)
    _, indices, result = plan.run(q, k, v)
    assert_matches_reference(q, k, v, indices, result, plan)


def test_early_stopping_triggers_in_the_grid():
    # Guard for the tests above: on their inputs most units with a history longer than one tile
    # stop early at threshold 0.02.
    case = CPU_CASES[1]
    q, k, v = make_qkv(case, peaky=True)
    for order_per_kv_head, group_units in MODES.values():
        modes = dict(order_per_kv_head=order_per_kv_head, group_units=group_units)
        _, _, (_, _, stopped) = run_pipeline(case, q, k, v, threshold=0.02, **modes)
        _, _, (_, _, full) = run_pipeline(case, q, k, v, **modes)
        long_history = full > full.min() + 1
        assert (stopped <= full).all()
        assert (stopped < full)[long_history].float().mean() > 0.5


def _sdpa_reference(case, q, k, v):
    group = case.q_heads // case.kv_heads
    if case.is_causal and case.q_offset:
        pos = torch.arange(case.num_queries)[:, None] + case.q_offset
        mask = torch.arange(case.num_keys)[None, :] <= pos
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=group > 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=case.is_causal, enable_gqa=group > 1)


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", list(MODES))
def test_threshold_zero_equals_sdpa(case, dtype, mode):
    q, k, v = make_qkv(case, dtype)
    order_per_kv_head, group_units = MODES[mode]
    _, _, (out, lse, counts) = run_pipeline(
        case, q, k, v, order_per_kv_head=order_per_kv_head, group_units=group_units
    )
    expected = _sdpa_reference(case, q.float(), k.float(), v.float())
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)
    _, dense_lse = reference.dense_attention(
        q, k, v, is_causal=case.is_causal, q_offset=case.q_offset
    )
    torch.testing.assert_close(lse, dense_lse, atol=1e-4, rtol=1e-5)
    # Threshold 0 visits every local and history tile.
    layout = case_layout(case)
    for t in range(counts.shape[-1]):
        row_end = min((t + 1) * case.block_m, case.num_queries)
        seg = t * case.block_m // case.segment_size
        local = 0
        if case.is_causal:
            local_keys = max(
                0, min(row_end + case.q_offset, case.num_keys) - layout.segment_start(seg)
            )
            local = math.ceil(local_keys / case.block_n)
        history = math.ceil(layout.history_length(seg) / case.block_n)
        assert (counts[..., t] == local + history).all()


STRUCTURED = Case(1, 8, 2, 4096, 4096, 64, 256, 32, 64)


def _structured(case: Case, seed: int):
    return data.structured_qkv(
        case.num_keys,
        q_heads=case.q_heads,
        kv_heads=case.kv_heads,
        head_dim=case.head_dim,
        dtype=torch.float32,
        seed=seed,
    )


def test_early_stopping_on_structured_data():
    """Stated bound: on the structured data at 4K (8 query heads, 2 KV heads, one unit per query
    head of 32 rows), threshold 0.03 computes at most 40% of the dense tiles with a relative L2
    error of the output below 8% (measured: 25-30% of the tiles, 5.1-5.6% error over seeds 3, 4)."""
    case = STRUCTURED
    q, k, v = _structured(case, seed=3)
    _, _, (out, _, counts) = run_pipeline(case, q, k, v, threshold=0.03)
    _, _, (_, _, full) = run_pipeline(case, q, k, v, threshold=0.0)
    dense, _ = reference.dense_attention(q, k, v)
    density = counts.sum().item() / (case_plan(case).dense_tiles() * counts.shape[1])
    rel_error = ((out - dense).norm() / dense.norm()).item()
    assert (counts <= full).all()
    assert density < 0.4
    assert rel_error < 0.08


def test_patience_visits_more_and_is_more_accurate():
    case = STRUCTURED
    q, k, v = _structured(case, seed=4)
    dense, _ = reference.dense_attention(q, k, v)
    _, _, (out1, _, counts1) = run_pipeline(case, q, k, v, threshold=0.02, patience=1)
    _, _, (out3, _, counts3) = run_pipeline(case, q, k, v, threshold=0.02, patience=3)
    assert (counts3 >= counts1).all() and counts3.sum() > counts1.sum()
    assert (out3 - dense).norm() < (out1 - dense).norm()


def test_patience_matches_reference():
    case = CPU_CASES[0]
    q, k, v = make_qkv(case, peaky=True)
    plan = case_plan(case, threshold=0.05, patience=2)
    _, indices, result = plan.run(q, k, v)
    assert_matches_reference(q, k, v, indices, result, plan)


@pytest.mark.parametrize("where", ["key", "query"])
def test_nan_propagates_like_sdpa(where):
    case = Case(1, 2, 1, 200, 200, 32, 64, 32, 32)
    q, k, v = make_qkv(case)
    target = {"key": k, "query": q}[where]
    target[0, 0, 70, 3] = float("nan")
    _, _, (out, _, _) = run_pipeline(case, q, k, v, threshold=0.05)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    # The same rows are NaN as in SDPA (a NaN key ranks first, so it is always visited); every
    # other row is finite.
    assert torch.equal(out.isnan().any(-1), expected.isnan().any(-1))
    assert out.isnan().any()


def test_nan_value_reaches_the_rows_that_attend_to_it():
    # Every row that attends to the key gets NaN. As in FlashAttention, rows of the same query
    # tile that load the key's tile but mask it get NaN too (weight 0 times NaN); rows of earlier
    # query tiles stay finite. (SDPA's math path spreads a NaN value to every row.)
    case = Case(1, 2, 1, 200, 200, 32, 64, 32, 32)
    q, k, v = make_qkv(case)
    v[0, 0, 70, 3] = float("nan")
    for threshold in (0.0, 0.05):
        _, _, (out, _, _) = run_pipeline(case, q, k, v, threshold=threshold)
        nan_rows = out.isnan().any(-1)
        assert not nan_rows[..., :64].any()  # query tiles before key 70's tile
        if threshold == 0.0:
            assert nan_rows[..., 70:].all()


def test_infinite_key_gives_non_finite_rows_like_sdpa():
    case = Case(1, 2, 1, 150, 150, 32, 64, 32, 32)
    q, k, v = make_qkv(case)
    k[0, 0, 20] = float("inf")
    _, _, (out, _, _) = run_pipeline(case, q, k, v, threshold=0.05)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.equal(out.isfinite().all(-1), expected.isfinite().all(-1))


def _unit_thresholds(batch: int, units: int) -> torch.Tensor:
    """Per unit head: skipped (-1), exact (0) or a loose threshold (0.05); each of them once at
    least where there are three unit heads or more."""
    choices = torch.tensor([-1.0, 0.0, 0.05])
    picks = torch.randint(0, 3, (batch, units))
    first = min(3, picks.numel())
    picks.view(-1)[:first] = torch.arange(first)
    return choices[picks]


@pytest.mark.parametrize("case", CPU_CASES[:3], ids=lambda c: c.id)
@pytest.mark.parametrize("mode", list(MODES))
def test_unit_threshold_matches_reference(case, mode):
    q, k, v = make_qkv(case, peaky=True)
    order_per_kv_head, group_units = MODES[mode]
    # threshold 0.3 is replaced by every unit head's own entry
    plan = case_plan(
        case, order_per_kv_head=order_per_kv_head, group_units=group_units, threshold=0.3
    )
    _, indices, _ = plan.run(q, k, v)
    units = case.kv_heads if group_units else case.q_heads
    unit_threshold = _unit_thresholds(case.batch, units)
    out, lse, counts = plan.attend(q, k, v, indices, unit_threshold=unit_threshold)
    ref = reference.sparse_attention(q, k, v, indices, plan, unit_threshold=unit_threshold)
    skipped = unit_threshold < 0
    assert bool((counts[skipped] == 0).all()) and bool((counts[~skipped] > 0).all())
    assert ref.tile_counts[skipped].sum() == 0
    clear = ref.decision_margin > DECISION_MARGIN
    assert torch.equal(counts[clear], ref.tile_counts[clear])
    head_skipped = skipped.repeat_interleave(q.shape[1] // units, dim=1)
    computed = ~head_skipped & clear.all(dim=-1).repeat_interleave(q.shape[1] // units, dim=1)
    atol, rtol = TOLERANCES[q.dtype]
    torch.testing.assert_close(out[computed], ref.out[computed], atol=atol, rtol=rtol)
    torch.testing.assert_close(lse[computed], ref.lse[computed], atol=1e-4, rtol=1e-5)
    # Heads at 0 are exact.
    exact = (unit_threshold == 0).repeat_interleave(q.shape[1] // units, dim=1)
    dense, _ = reference.dense_attention(q, k, v, is_causal=case.is_causal, q_offset=case.q_offset)
    torch.testing.assert_close(out[exact], dense[exact], atol=atol, rtol=rtol)


def test_unit_threshold_errors():
    case = CPU_CASES[0]
    q, k, v = make_qkv(case)
    plan = case_plan(case)
    _, indices, _ = plan.run(q, k, v)
    for bad, message in (
        (torch.zeros(1, case.q_heads, dtype=torch.float64), "unit_threshold must be float32"),
        (torch.zeros(1, case.q_heads + 1), r"unit_threshold must have shape \[B, unit heads\]"),
        (torch.zeros(case.q_heads), r"unit_threshold must have shape"),
    ):
        with pytest.raises(RuntimeError, match=message):
            plan.attend(q, k, v, indices, unit_threshold=bad)


_CPU_TILES_SCRIPT = """
import sys, torch
from s2o import S2OConfig, data
from s2o.plan import Plan
q, k, v = data.structured_qkv(700, q_heads=4, kv_heads=2, head_dim=64, seed=3,
                              dtype=getattr(torch, sys.argv[3]))
plan = Plan.for_call(S2OConfig(threshold=float(sys.argv[2]), min_keys=1), q.shape, k.shape,
                     is_causal=True, scale=None)
out, lse, counts = plan.attend(q, k, v, plan.permute(plan.estimate(q, k)))
torch.save((out, lse, counts, plan.block_m), sys.argv[1])
"""


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("threshold", [0.0, 0.003])
def test_cpu_matrix_unit_tiles_agree_with_the_fp32_loops(tmp_path, threshold, dtype):
    """bf16 and fp32 tile products run on ATen's micro-kernels (bf16 where the CPU has them);
    S2O_CPU_MATRIX_UNITS=0 forces the fp32 loops. Both compute the same attention (a process
    each: the switch is read once)."""
    import os
    import subprocess
    import sys

    results = {}
    for setting in ("1", "0"):
        path = tmp_path / f"tiles{setting}.pt"
        env = {**os.environ, "S2O_CPU_MATRIX_UNITS": setting}
        args = [str(path), str(threshold), str(dtype).removeprefix("torch.")]
        subprocess.run([sys.executable, "-c", _CPU_TILES_SCRIPT, *args], env=env, check=True)
        results[setting] = torch.load(path)
    (out, lse, counts, block_m), (loop_out, loop_lse, loop_counts, _) = results["1"], results["0"]
    atol, rtol = TOLERANCES[dtype]
    # Tile counts may differ only at near-threshold stop decisions.
    assert (counts == loop_counts).float().mean() > 0.95
    same = (counts == loop_counts).repeat_interleave(block_m, dim=-1)[..., : out.shape[2]]
    torch.testing.assert_close(out.float()[same], loop_out.float()[same], atol=atol, rtol=rtol)
    torch.testing.assert_close(lse[same], loop_lse[same], atol=1e-2, rtol=1e-3)
