import importlib
import logging

import pytest
import torch
import torch.nn.functional as F

import s2o
from s2o import S2OConfig, S2OFallbackError, data, reference

# The module (the package attribute s2o.attention is the function).
attention_module = importlib.import_module("s2o.attention")

EXACT = S2OConfig(threshold=0.0, min_keys=1, segment_size=64)


def _inputs(b=1, hq=4, hkv=2, nq=200, nk=200, d=64, dtype=torch.float32):
    return (
        torch.randn(b, hq, nq, d, dtype=dtype),
        torch.randn(b, hkv, nk, d, dtype=dtype),
        torch.randn(b, hkv, nk, d, dtype=dtype),
    )


@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("ordering", ["kv_head", "query_head"])
@pytest.mark.parametrize("shape", [(1, 4, 2, 200, 200), (2, 4, 4, 150, 150), (1, 8, 1, 100, 230)])
def test_threshold_zero_matches_sdpa(is_causal, ordering, shape):
    q, k, v = _inputs(*shape)
    config = S2OConfig(threshold=0.0, min_keys=1, segment_size=64, ordering=ordering)
    gqa = shape[1] != shape[2]
    out = s2o.attention(q, k, v, is_causal=is_causal, enable_gqa=gqa, config=config)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=gqa)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def test_positional_signature_scale_and_3d_inputs():
    q, k, v = (torch.randn(2, 130, 32) for _ in range(3))
    out = s2o.attention(q, k, v, None, 0.0, True, 0.3, config=EXACT)
    expected = F.scaled_dot_product_attention(q, k, v, None, 0.0, True, scale=0.3)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def test_bottom_right_alignment_matches_explicit_mask():
    q, k, v = _inputs(nq=90, nk=300)
    config = S2OConfig(threshold=0.0, min_keys=1, segment_size=32, causal_alignment="bottom_right")
    out = s2o.attention(q, k, v, is_causal=True, enable_gqa=True, config=config)
    expected, _ = reference.dense_attention(q, k, v, is_causal=True, q_offset=300 - 90)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="bottom-right"):
        s2o.attention(*_inputs(nq=300, nk=90), is_causal=True, enable_gqa=True, config=config)


@pytest.mark.parametrize("reason", ["short", "autograd", "decode"])
def test_dense_fallbacks_keep_the_bottom_right_alignment(reason):
    # SDPA's is_causal is top-left: a fallback of a chunked prefill (fewer queries than keys)
    # must still put the queries at the end.
    q, k, v = _inputs(nq=1 if reason == "decode" else 90, nk=300)
    config = S2OConfig(min_keys=1000 if reason == "short" else 1, causal_alignment="bottom_right")
    if reason == "autograd":
        q.requires_grad_(True)
    out, stats = s2o.attention(
        q, k, v, is_causal=True, enable_gqa=True, config=config, return_stats=True
    )
    assert stats.fallback_reason == reason
    expected, _ = reference.dense_attention(q, k, v, is_causal=True, q_offset=300 - q.shape[2])
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def test_default_config_on_structured_data_is_sparse_and_accurate():
    q, k, v = data.structured_qkv(4096, q_heads=8, kv_heads=2, head_dim=64, dtype=torch.float32)
    config = S2OConfig(min_keys=1)  # the defaults but for the length cut-off
    out, stats = s2o.attention(
        q, k, v, is_causal=True, enable_gqa=True, config=config, return_stats=True
    )
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert stats.path == "sparse" and stats.fallback_reason is None
    assert stats.density < 0.8
    assert ((out - dense).norm() / dense.norm()).item() < 0.10
    assert stats.tile_counts.shape == (1, 8, 4096 // stats.block_m)  # a unit per query head
    assert set(stats.time_ms) == {"estimate", "permute", "attend", "check"}


def test_ranked_keys_reaches_the_ranking():
    """A head shorter than the histories changes which keys a unit visits (the tail is in index
    order), stays accurate at the default threshold, and is exact at threshold 0."""
    q, k, v = data.structured_qkv(2048, q_heads=4, kv_heads=1, head_dim=64, dtype=torch.float32)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def run(**overrides):
        config = S2OConfig(min_keys=1, **overrides)
        return s2o.attention(
            q, k, v, is_causal=True, enable_gqa=True, config=config, return_stats=True
        )

    everything, _ = run(ranked_keys=0)
    head, _ = run(ranked_keys=256)
    assert not torch.equal(head, everything)
    assert ((head - dense).norm() / dense.norm()).item() < 0.10
    exact, _ = run(ranked_keys=1, threshold=0.0)
    torch.testing.assert_close(exact, dense, atol=1e-5, rtol=1e-4)


def test_score_variance_reaches_the_ranking():
    """The variance term changes which keys a unit visits, stays accurate at the default
    threshold, and is exact at threshold 0."""
    q, k, v = data.structured_qkv(2048, q_heads=4, kv_heads=1, head_dim=64, dtype=torch.float32)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def run(**overrides):
        config = S2OConfig(min_keys=1, **overrides)
        return s2o.attention(q, k, v, is_causal=True, enable_gqa=True, config=config)

    plain, spread = run(score_variance=0.0), run(score_variance=0.5)
    assert not torch.equal(spread, plain)
    assert ((spread - dense).norm() / dense.norm()).item() < 0.10
    exact = run(score_variance=0.5, threshold=0.0)
    torch.testing.assert_close(exact, dense, atol=1e-5, rtol=1e-4)


def _fallback_cases():
    q, k, v = _inputs(nk=200, nq=200)
    mask = torch.ones(200, 200, dtype=torch.bool).tril()
    grad_q = q.clone().requires_grad_(True)
    q1 = q[:, :, :1]
    return {
        "attn_mask": ((q, k, v), dict(attn_mask=mask, enable_gqa=True)),
        "dropout": ((q, k, v), dict(dropout_p=0.5, is_causal=True, enable_gqa=True)),
        "autograd": ((grad_q, k, v), dict(is_causal=True, enable_gqa=True)),
        "decode": ((q1, k, v), dict(enable_gqa=True)),
        "rank": (
            (q[0, 0, None, None, None], k[0, 0, None, None, None], v[0, 0, None, None, None]),
            dict(is_causal=True),
        ),
        "dtype": ((q.double(), k.double(), v.double()), dict(is_causal=True, enable_gqa=True)),
    }


@pytest.mark.parametrize("reason", list(_fallback_cases()))
def test_fallbacks_run_dense_sdpa_and_log_once(reason, caplog, monkeypatch):
    monkeypatch.setattr(attention_module, "_logged_reasons", set())
    (q, k, v), kwargs = _fallback_cases()[reason]
    torch.manual_seed(1)
    with caplog.at_level(logging.INFO, logger="s2o"):
        out, stats = s2o.attention(q, k, v, **kwargs, config=EXACT, return_stats=True)
        s2o.attention(q, k, v, **kwargs, config=EXACT)
    torch.manual_seed(1)
    expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert stats.path == "dense" and stats.fallback_reason == reason
    torch.testing.assert_close(out, expected)
    assert [r.message.count(f"({reason})") for r in caplog.records] == [1]


def test_short_sequences_fall_back():
    q, k, v = _inputs()
    _, stats = s2o.attention(q, k, v, is_causal=True, enable_gqa=True, return_stats=True)
    assert stats.fallback_reason == "short"  # 200 keys < the default min_keys


@pytest.mark.parametrize("reason", ["attn_mask", "decode"])
def test_strict_mode_raises_instead_of_falling_back(reason, monkeypatch):
    (q, k, v), kwargs = _fallback_cases()[reason]
    with pytest.raises(S2OFallbackError, match=reason):
        s2o.attention(q, k, v, **kwargs, config=S2OConfig(min_keys=1, segment_size=64, strict=True))
    monkeypatch.setenv("S2O_STRICT", "1")
    with pytest.raises(S2OFallbackError, match=reason):
        s2o.attention(q, k, v, **kwargs, config=EXACT)


def test_differing_head_counts_need_enable_gqa_like_sdpa():
    q, k, v = _inputs()
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with pytest.raises(RuntimeError):
        s2o.attention(q, k, v, is_causal=True, config=EXACT)


class _Attn(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def test_patch_sdpa_swaps_and_restores():
    q, k, v = _inputs()
    original = F.scaled_dot_product_attention
    config = S2OConfig(threshold=0.5, min_keys=1, segment_size=64)
    with s2o.patch_sdpa(config):
        assert F.scaled_dot_product_attention is not original
        patched = _Attn()(q, k, v)
    assert F.scaled_dot_product_attention is original
    direct = s2o.attention(q, k, v, is_causal=True, enable_gqa=True, config=config)
    assert torch.equal(patched, direct)
    assert not torch.equal(patched, _Attn()(q, k, v))  # threshold 0.5 is not exact


class _S2OAttn(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config

    def forward(self, q, k, v):
        return s2o.attention(q, k, v, is_causal=True, enable_gqa=True, config=self.config) * 2


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    q, k, v = _inputs()
    module = _S2OAttn(S2OConfig(threshold=0.05, min_keys=1, segment_size=64))
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(q, k, v), module(q, k, v))


@pytest.mark.parametrize("ordering", ["kv_head", "query_head"])
def test_head_chunking_gives_the_same_result(ordering):
    q, k, v = data.structured_qkv(1024, q_heads=8, kv_heads=4, head_dim=32, dtype=torch.float32)
    whole = S2OConfig(threshold=0.02, min_keys=1, segment_size=64, ordering=ordering)
    chunked = S2OConfig(
        threshold=0.02, min_keys=1, segment_size=64, ordering=ordering, workspace_bytes=1
    )
    out, stats = s2o.attention(
        q, k, v, is_causal=True, enable_gqa=True, config=whole, return_stats=True
    )
    out2, stats2 = s2o.attention(
        q, k, v, is_causal=True, enable_gqa=True, config=chunked, return_stats=True
    )
    assert torch.equal(out, out2)
    assert torch.equal(stats.tile_counts, stats2.tile_counts)
    assert stats.density == stats2.density


def test_sample_rows_are_even_for_flat_weights_and_follow_heavy_rows():
    from s2o.error_estimate import sample_rows

    for num_queries, count in ((1000, 64), (64, 64), (10, 64), (4097, 7)):
        rows, factors = sample_rows(torch.ones(num_queries), count)
        n = min(count, num_queries)
        assert rows.shape == factors.shape == (n,) and rows.dtype == torch.int64
        bounds = torch.arange(n + 1) * num_queries // n  # stratum i: rows [bounds[i], bounds[i+1])
        assert bool((rows >= bounds[:-1]).all()) and bool((rows < bounds[1:]).all())
        torch.testing.assert_close(factors, torch.full((n,), num_queries / n))
    # Rows heavy in the weights get more of the sample, each standing for fewer rows; the
    # factors still add up to the number of rows.
    weights = 1.0 / torch.arange(1, 4097, dtype=torch.float32)
    rows, factors = sample_rows(weights, 64)
    assert bool((rows[1:] >= rows[:-1]).all()) and int(rows[0]) == 0
    assert int((rows < 64).sum()) > 16 and bool((factors[1:] >= factors[:-1] * 0.999).all())
    assert abs(float(factors.sum()) / 4096 - 1) < 0.1


def _per_head_error(out, dense):
    return ((out - dense).norm(dim=(2, 3)) / dense.norm(dim=(2, 3)))[0]


def test_error_estimate_tracks_the_true_error():
    q, k, v = data.structured_qkv(4096, q_heads=8, kv_heads=2, head_dim=64, dtype=torch.float32)
    config = S2OConfig(
        min_keys=1, threshold=0.1, patience=1, tail_threshold=None, error_budget=None,
        estimate_rows=256,
    )  # fmt: skip
    out, stats = s2o.attention(
        q, k, v, is_causal=True, enable_gqa=True, config=config, return_stats=True
    )
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    true = _per_head_error(out, dense)
    assert stats.head_error.shape == (1, 8) and not bool(stats.recomputed.any())
    assert float(true.min()) > 0.005  # a threshold loose enough that there is an error to see
    ratio = stats.head_error[0] / true
    assert 0.6 < float(ratio.median()) < 1.6, ratio
    overall = ((out - dense).norm() / dense.norm()).item()
    assert 0.5 < stats.error / overall < 2.0


def _diffuse_qkv():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, 4096, 64, generator=generator)
    k, v = (torch.randn(1, 2, 4096, 64, generator=generator) for _ in range(2))
    return q, k, v


def test_tail_threshold_keeps_diffuse_attention_inside_the_budget():
    """Random Q/K/V at a threshold that alone stops the late rows with much of their mass
    missing (above): the default tail threshold keeps every head inside the 10% budget and every
    block of 128 rows under 20%, without the budget's recomputation."""
    q, k, v = _diffuse_qkv()
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    config = S2OConfig(min_keys=1, threshold=0.05, patience=1, error_budget=None)
    out, stats = s2o.attention(
        q, k, v, is_causal=True, enable_gqa=True, config=config, return_stats=True
    )
    assert stats.density < 1.0
    assert float(_per_head_error(out, dense).max()) < 0.1
    squared = (out - dense).square().sum(dim=-1)[0].unflatten(1, (-1, 128)).sum(dim=(0, 2))
    norms = dense.square().sum(dim=-1)[0].unflatten(1, (-1, 128)).sum(dim=(0, 2))
    assert float((squared / norms).sqrt().max()) < 0.2


def test_error_estimate_tracks_the_true_error_on_diffuse_attention():
    """Random Q/K/V: a row's output norm falls with its position, so the few first rows hold
    much of a head's norm while the later rows, which stop with mass missing, hold the error.
    An even sample that includes row 0 read about half the true error here; drawn by the
    output norm the estimate is within 10% for every head. (Without the tail projection, which
    keeps such rows going: test_tail_threshold_keeps_diffuse_attention_inside_the_budget.)"""
    q, k, v = _diffuse_qkv()
    config = S2OConfig(
        min_keys=1, threshold=0.05, patience=1, tail_threshold=None, error_budget=None
    )
    out, stats = s2o.attention(
        q, k, v, is_causal=True, enable_gqa=True, config=config, return_stats=True
    )
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    true = _per_head_error(out, dense)
    assert float(true.min()) > 0.1  # the late rows stop early: a large error to see
    ratio = stats.head_error[0] / true
    assert 0.75 < float(ratio.min()) and float(ratio.max()) < 1.33, ratio


def test_error_budget_recomputes_the_heads_over_it_exactly():
    q, k, v = data.structured_qkv(2048, q_heads=8, kv_heads=2, head_dim=64, dtype=torch.float32)
    loose = dict(min_keys=1, threshold=0.3, patience=1, tail_threshold=None)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    free, free_stats = s2o.attention(
        q, k, v, is_causal=True, enable_gqa=True,
        config=S2OConfig(**loose, error_budget=None), return_stats=True,
    )  # fmt: skip
    budget = float(free_stats.head_error.median())  # some heads over it, some under
    out, stats = s2o.attention(
        q, k, v, is_causal=True, enable_gqa=True,
        config=S2OConfig(**loose, error_budget=budget), return_stats=True,
    )  # fmt: skip
    over = free_stats.head_error[0] > budget
    assert torch.equal(stats.recomputed[0], over) and 0 < stats.recomputed_heads < 8
    assert torch.equal(stats.head_error, free_stats.head_error)
    assert torch.equal(out[:, ~over], free[:, ~over])
    # Recomputed heads are exact and cost tiles on top of the first pass; the others cost
    # nothing more.
    error, free_error = _per_head_error(out, dense), _per_head_error(free, dense)
    assert float(error[over].max()) < 1e-5 and bool((error[over] < free_error[over]).all())
    redo = stats.tile_counts - free_stats.tile_counts
    assert bool((redo[:, ~over] == 0).all()) and bool((redo[:, over] > 0).all())
    assert stats.density > free_stats.density
    assert stats.error < free_stats.error


def test_error_budget_of_zero_recomputes_every_head_exactly():
    q, k, v = data.structured_qkv(2048, q_heads=8, kv_heads=2, head_dim=64, dtype=torch.float32)
    config = S2OConfig(min_keys=1, threshold=0.3, patience=1, tail_threshold=None, error_budget=0.0)
    out, stats = s2o.attention(
        q, k, v, is_causal=True, enable_gqa=True, config=config, return_stats=True
    )
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert stats.recomputed_heads == 8 and stats.error == 0.0
    torch.testing.assert_close(out, dense, atol=2e-5, rtol=2e-5)


def test_error_budget_in_strict_mode_raises_naming_the_head():
    q, k, v = data.structured_qkv(2048, q_heads=8, kv_heads=2, head_dim=64, dtype=torch.float32)
    config = S2OConfig(
        min_keys=1, threshold=0.3, patience=1, tail_threshold=None, error_budget=0.001, strict=True
    )
    with pytest.raises(s2o.S2OErrorBudgetError, match=r"query head \d+ \(batch 0\).*error_budget"):
        s2o.attention(q, k, v, is_causal=True, enable_gqa=True, config=config)


def test_error_budget_config_errors():
    with pytest.raises(ValueError, match="error_budget"):
        S2OConfig(error_budget=-0.1)
    with pytest.raises(ValueError, match="estimate_rows"):
        S2OConfig(estimate_rows=0)
    S2OConfig(estimate_rows=0, error_budget=None)  # no estimate, no budget
