"""CUDA kernels against the CPU kernels (the specification): indices exactly, outputs to dtype
tolerance, tile counts equal except at near-threshold decisions. Needs a GPU."""

import pytest
import torch
import torch.nn.functional as F

import s2o
from s2o import S2OConfig, data, reference
from s2o.layout import SegmentLayout
from s2o.limits import COUNTING_RANK_BITS

from .conftest import MODES, Case, case_plan, make_plan, make_qkv, run_pipeline, runs_wgmma_kernel

pytestmark = pytest.mark.cuda

# The CUDA kernels take bf16/fp16, head dim 64/128, block_n 64 and at most 128 rows per unit.
CUDA_CASES = [
    Case(1, 4, 4, 300, 300, 64, 64, 16, 64),  # MHA
    Case(2, 8, 2, 257, 257, 128, 64, 32, 64),  # GQA (4 x 32 = 128 rows per unit), batch 2
    Case(1, 6, 1, 200, 333, 64, 48, 16, 64, q_offset=133),  # MQA (96 rows), bottom-right
    Case(1, 4, 2, 150, 400, 128, 32, 16, 64),  # top-left with Nq < Nk
    Case(1, 4, 2, 300, 200, 64, 64, 32, 64),  # top-left with Nq > Nk
    Case(1, 4, 2, 190, 260, 128, 64, 32, 64, is_causal=False),  # no mask
    Case(1, 2, 1, 40, 40, 64, 64, 64, 64),  # shorter than one segment and one tile
    Case(1, 32, 8, 1000, 1000, 128, 256, 32, 64),  # Llama-3 head shape
]
DTYPES = [torch.bfloat16, torch.float16]
# Output tolerance of the CUDA kernel against the CPU kernel on the same inputs: the CUDA kernel
# rounds the probabilities to the input dtype before the P V product (as FlashAttention does).
CUDA_TOLERANCES = {torch.bfloat16: (3e-2, 3e-2), torch.float16: (4e-3, 4e-3)}
DECISION_MARGIN = 1e-3
# The two sparse attention kernels: mma.sync (any GPU) and wgmma (Hopper, sm_90a builds).
ATTENTION_KERNELS = ["sm80", "sm90"]


@pytest.fixture(params=ATTENTION_KERNELS)
def attention_kernel(request, monkeypatch):
    """Runs the test with the sparse attention kernel forced through S2O_ATTENTION_KERNEL."""
    if request.param == "sm90" and not runs_wgmma_kernel():
        pytest.skip("the wgmma kernel needs a compute capability 9.0 GPU")
    monkeypatch.setenv("S2O_ATTENTION_KERNEL", request.param)
    return request.param


def _pair(case, dtype, contiguous=True, peaky=True):
    """The same random inputs on the CPU and the GPU."""
    cpu = make_qkv(case, dtype, contiguous=contiguous, peaky=peaky)
    return cpu, tuple(t.cuda() for t in cpu)


@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("order_per_kv_head", [True, False], ids=["kvhead", "qhead"])
@pytest.mark.parametrize("score_variance", [0.0, 0.3], ids=["mean", "variance"])
def test_estimate_importance_is_bitwise_equal_to_cpu(
    case, dtype, order_per_kv_head, score_variance
):
    (q, k, _), (qc, kc, _) = _pair(case, dtype, contiguous=case.batch == 1)
    plan = case_plan(case, order_per_kv_head=order_per_kv_head, score_variance=score_variance)
    assert torch.equal(plan.estimate(qc, kc).cpu(), plan.estimate(q, k))


# ranked_keys 0 ranks everything: radix sort above 12 bits, counting sort below; a prefix needs the
# counting sort.
RANKINGS = [(32, 0), (16, 0), (12, 0), (3, 0)] + [(b, h) for b in (12, 3) for h in (1, 50, 200)]


@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize(("rank_bits", "ranked_keys"), RANKINGS)
def test_permute_indices_is_equal_to_cpu(case, rank_bits, ranked_keys):
    (q, k, _), _ = _pair(case, torch.bfloat16)
    plan = case_plan(case, rank_bits=rank_bits, ranked_keys=ranked_keys)
    scores = plan.estimate(q, k)
    assert torch.equal(plan.permute(scores.cuda()).cpu(), plan.permute(scores))


def test_permute_indices_head_needs_counting_sort_on_cuda():
    scores = torch.randn(1, 1, 8, device="cuda")
    plan = make_plan(SegmentLayout(9, 9, 8), rank_bits=COUNTING_RANK_BITS + 1, ranked_keys=2)
    with pytest.raises(RuntimeError, match=f"rank_bits <= {COUNTING_RANK_BITS}"):
        plan.permute(scores)


@pytest.mark.parametrize("rank_bits", [32, 12])
def test_permute_indices_special_values_on_cuda(rank_bits):
    nan, inf = float("nan"), float("inf")
    scores = torch.tensor([1.0, -0.0, 3.0, 1.0, nan, 0.0, -inf, 3.0]).view(1, 1, 8).cuda()
    indices = make_plan(SegmentLayout(9, 9, 8), rank_bits=rank_bits).permute(scores)
    assert indices[0, 0].tolist() == [4, 2, 7, 0, 3, 1, 5, 6]


@pytest.mark.parametrize("rank_bits", [12, 7, 1])
@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("ranked_keys", [0, 1000])
def test_permute_indices_long_histories_with_ties(rank_bits, is_causal, ranked_keys):
    """Histories long enough that every warp of the counting sort owns many keys, with few
    distinct scores so that the tie order (lower index first) decides most positions."""
    layout = SegmentLayout(6000, 7000, 512, 1000, is_causal)
    plan = make_plan(layout, rank_bits=rank_bits, ranked_keys=ranked_keys)
    generator = torch.Generator().manual_seed(0)
    levels = torch.tensor([-3.0, -0.5, 0.0, 0.25, 0.26, 2.0, 40.0])
    scores = levels[torch.randint(len(levels), (2, 3, layout.total_history), generator=generator)]
    scores += 1e-3 * torch.randn(scores.shape, generator=generator)
    assert torch.equal(plan.permute(scores.cuda()).cpu(), plan.permute(scores))


@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("threshold, tail", [(0.0, None), (0.02, None), (0.02, 0.05)])
def test_sparse_attention_matches_cpu(case, dtype, mode, threshold, tail, attention_kernel):
    order_per_kv_head, group_units = MODES[mode]
    if group_units and case.q_heads // case.kv_heads * case.block_m > 128:
        pytest.skip("unit larger than the CUDA kernel's 128 rows")
    (q, k, v), (qc, kc, vc) = _pair(case, dtype, contiguous=case.batch == 1)
    modes = dict(order_per_kv_head=order_per_kv_head, group_units=group_units)
    plan = case_plan(case, threshold=threshold, tail_threshold=tail, **modes)
    scores, indices, (out, lse, counts) = plan.run(q, k, v)
    _, indices_c, (out_c, lse_c, counts_c) = plan.run(qc, kc, vc)
    assert torch.equal(indices_c.cpu(), indices)
    ref = reference.sparse_attention(q, k, v, indices, plan)
    clear = ref.decision_margin > DECISION_MARGIN
    assert clear.float().mean() > 0.9
    assert torch.equal(counts[clear], ref.tile_counts[clear])
    assert torch.equal(counts_c.cpu()[clear], counts[clear])
    if bool(clear.all()):
        atol, rtol = CUDA_TOLERANCES[dtype]
        torch.testing.assert_close(out_c.cpu().float(), out.float(), atol=atol, rtol=rtol)
        torch.testing.assert_close(lse_c.cpu(), lse, atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("shape", [(1, 32, 8, 2048, 128), (2, 8, 8, 1500, 64), (1, 8, 1, 777, 128)])
def test_threshold_zero_matches_sdpa(is_causal, shape, attention_kernel):
    b, hq, hkv, n, d = shape
    q = torch.randn(b, hq, n, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    config = S2OConfig(threshold=0.0, min_keys=1, strict=True)
    out = s2o.attention(q, k, v, is_causal=is_causal, enable_gqa=hq != hkv, config=config)
    expected = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=is_causal, enable_gqa=hq != hkv
    )
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def test_structured_long_sequence_against_cpu_and_dense(attention_kernel):
    """At 4K on the structured data (Llama head shape), the GPU computes the CPU kernel's tile
    counts (all but near-threshold units) and stays within the error of the sparse method."""
    q, k, v = data.structured_qkv(4096, dtype=torch.bfloat16, seed=2)
    config = S2OConfig(threshold=0.02, min_keys=1, strict=True, error_budget=None)
    out, stats = s2o.attention(
        q, k, v, is_causal=True, enable_gqa=True, config=config, return_stats=True
    )
    out_c, stats_c = s2o.attention(
        q.cuda(),
        k.cuda(),
        v.cuda(),
        is_causal=True,
        enable_gqa=True,
        config=config,
        return_stats=True,
    )
    same = (stats_c.tile_counts.cpu() == stats.tile_counts).float().mean()
    assert same > 0.98
    assert abs(stats_c.density - stats.density) < 0.01
    dense = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True
    )
    err_cpu = (out.float() - dense).norm() / dense.norm()
    err_gpu = (out_c.cpu().float() - dense).norm() / dense.norm()
    assert err_gpu < 0.1 and abs(err_gpu - err_cpu) < 0.01


def test_cuda_graph_capture():
    q = torch.randn(1, 8, 1024, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, 1024, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    # Not strict: the error estimate and the budget's recomputation are captured too (strict mode
    # reads the estimate back to raise, a host sync).
    config = S2OConfig(threshold=0.01, min_keys=1, error_budget=0.05)
    eager = s2o.attention(q, k, v, is_causal=True, enable_gqa=True, config=config)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph
        s2o.attention(q, k, v, is_causal=True, enable_gqa=True, config=config)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = s2o.attention(q, k, v, is_causal=True, enable_gqa=True, config=config)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(
        captured, s2o.attention(q, k, v, is_causal=True, enable_gqa=True, config=config)
    )
    assert not torch.equal(captured, eager)


def test_nan_key_reaches_the_rows_that_attend_to_it(attention_kernel):
    # A NaN key ranks first, so every row that can see it attends to it and gets NaN; rows of
    # query tiles before its position stay finite. (SDPA's CUDA backends spread it to every row.)
    case = Case(1, 2, 1, 300, 300, 64, 64, 32, 64)
    _, (q, k, v) = _pair(case, torch.bfloat16, peaky=False)
    k[0, 0, 70, 3] = float("nan")
    _, _, (out, _, _) = run_pipeline(case, q, k, v, threshold=0.05)
    nan_rows = out.isnan().any(-1).cpu()
    assert nan_rows[..., 70:].all()
    assert not nan_rows[..., :64].any()


def test_cuda_input_errors():
    q = torch.randn(1, 4, 100, 32, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 100, 32, device="cuda", dtype=torch.bfloat16)
    plan = make_plan(SegmentLayout(100, 100, 32))
    with pytest.raises(RuntimeError, match="head dim must be 64 or 128"):
        plan.estimate(q, k)
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        plan.estimate(q.float(), k.float())
    case = Case(1, 4, 2, 100, 100, 64, 32, 16, 64)
    _, (q, k, v) = _pair(case, torch.bfloat16)
    plan = case_plan(case)
    _, indices, _ = plan.run(q, k, v)
    with pytest.raises(RuntimeError, match="block_n=64"):
        plan.replace(block_n=32).attend(q, k, v, indices)
    big = Case(1, 16, 1, 100, 100, 64, 32, 16, 64)
    _, (q, k, v) = _pair(big, torch.bfloat16)
    plan = case_plan(big, group_units=True)
    indices = plan.permute(plan.estimate(q, k))
    with pytest.raises(RuntimeError, match="at most 128 rows"):
        plan.attend(q, k, v, indices)


def test_attention_kernel_choice_is_checked(monkeypatch):
    case = Case(1, 4, 2, 100, 100, 64, 32, 16, 64)
    _, (q, k, v) = _pair(case, torch.bfloat16)
    monkeypatch.setenv("S2O_ATTENTION_KERNEL", "fastest")
    with pytest.raises(RuntimeError, match="must be auto, sm80 or sm90"):
        run_pipeline(case, q, k, v)
    if not runs_wgmma_kernel():
        monkeypatch.setenv("S2O_ATTENTION_KERNEL", "sm90")
        with pytest.raises(RuntimeError, match="compute capability 9.0"):
            run_pipeline(case, q, k, v)


def test_head_chunking_gives_the_same_result():
    q, k, v = (t.cuda() for t in data.structured_qkv(2048, dtype=torch.bfloat16, seed=7))
    whole = S2OConfig(threshold=0.02, min_keys=1)
    chunked = S2OConfig(threshold=0.02, min_keys=1, workspace_bytes=1)  # one KV head at a time
    out, stats = s2o.attention(
        q, k, v, is_causal=True, enable_gqa=True, config=whole, return_stats=True
    )
    out2, stats2 = s2o.attention(
        q, k, v, is_causal=True, enable_gqa=True, config=chunked, return_stats=True
    )
    assert torch.equal(out, out2) and torch.equal(stats.tile_counts, stats2.tile_counts)


@pytest.mark.parametrize("case", [CUDA_CASES[1], CUDA_CASES[2], CUDA_CASES[7]], ids=lambda c: c.id)
@pytest.mark.parametrize("mode", list(MODES))
def test_unit_threshold_matches_cpu(case, mode, attention_kernel):
    """Per unit head thresholds: skipped units (-1) count 0 tiles and leave their rows alone,
    exact ones (0) and loose ones compute what the CPU kernel computes."""
    order_per_kv_head, group_units = MODES[mode]
    if group_units and case.q_heads // case.kv_heads * case.block_m > 128:
        pytest.skip("unit larger than the CUDA kernel's 128 rows")
    (q, k, v), (qc, kc, vc) = _pair(case, torch.bfloat16)
    plan = case_plan(
        case, order_per_kv_head=order_per_kv_head, group_units=group_units, threshold=0.5
    )
    indices = plan.permute(plan.estimate(q, k))
    units = case.kv_heads if group_units else case.q_heads
    unit_threshold = torch.tensor([-1.0, 0.0, 0.03])[torch.arange(case.batch * units) % 3]
    unit_threshold = unit_threshold.view(case.batch, units)
    out, lse, counts = plan.attend(q, k, v, indices, unit_threshold=unit_threshold)
    out_c, lse_c, counts_c = plan.attend(
        qc, kc, vc, indices.cuda(), unit_threshold=unit_threshold.cuda()
    )
    ref = reference.sparse_attention(q, k, v, indices, plan, unit_threshold=unit_threshold)
    skipped = unit_threshold < 0
    assert bool((counts_c.cpu()[skipped] == 0).all()) and bool((counts_c.cpu()[~skipped] > 0).all())
    clear = ref.decision_margin > DECISION_MARGIN
    assert torch.equal(counts_c.cpu()[clear], counts[clear])
    group = case.q_heads // units
    computed = (~skipped & clear.all(dim=-1)).repeat_interleave(group, dim=1)
    atol, rtol = CUDA_TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(
        out_c.cpu()[computed].float(), out[computed].float(), atol=atol, rtol=rtol
    )
    torch.testing.assert_close(lse_c.cpu()[computed], lse[computed], atol=2e-3, rtol=1e-4)


def test_error_budget_on_cuda_recomputes_the_heads_over_it():
    q, k, v = data.structured_qkv(2048, q_heads=8, kv_heads=2, head_dim=128, dtype=torch.bfloat16)
    q, k, v = q.cuda(), k.cuda(), v.cuda()
    loose = dict(min_keys=1, threshold=0.3, patience=1, tail_threshold=None)
    dense = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True
    )
    free, free_stats = s2o.attention(
        q, k, v, is_causal=True, enable_gqa=True, return_stats=True,
        config=S2OConfig(**loose, error_budget=None),
    )  # fmt: skip
    out, stats = s2o.attention(
        q, k, v, is_causal=True, enable_gqa=True, return_stats=True,
        config=S2OConfig(**loose, error_budget=0.02),
    )  # fmt: skip
    over = stats.recomputed[0]
    assert torch.equal(over, free_stats.head_error[0] > 0.02) and 0 < int(over.sum()) <= 8
    assert torch.equal(out[:, ~over], free[:, ~over])

    def error(t):
        return ((t.float() - dense).norm(dim=(2, 3)) / dense.norm(dim=(2, 3)))[0]

    assert bool((error(out)[over] < error(free)[over]).all())
    assert float(error(out)[over].max()) < 0.01  # exact, to bf16 rounding


@pytest.mark.parametrize("is_causal", [True, False])
def test_error_estimate_exact_rows_over_key_chunks(is_causal):
    """Past _KEY_CHUNK keys the sampled rows are computed in key chunks merged by their
    log-sum-exp (whole chunks and an unaligned tail): the same rows as fp32 dense attention."""
    from s2o import error_estimate

    n = 2 * error_estimate._KEY_CHUNK + 3001
    q = torch.randn(2, 8, n, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, n, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k[:, :, ::997] *= 4  # a few keys that some rows attend to strongly
    rows, _ = error_estimate.sample_rows(torch.ones(n, device=q.device), 48)
    exact = error_estimate.exact_rows(q, k, v, rows, q_offset=0, is_causal=is_causal, scale=None)
    expected = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=is_causal, enable_gqa=True
    )[:, :, rows]
    torch.testing.assert_close(exact.float(), expected, atol=2e-2, rtol=2e-2)
