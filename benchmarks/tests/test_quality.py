"""The quality benchmark's machinery: baselines, curve matching, the s2o sweep and a reduced smoke
run that checks its own output."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import s2o
from benchmarks import ablations, baselines, inputs, matching, quality, s2o_curve
from benchmarks.common import benchmark_config
from s2o.plan import Plan
from tests.conftest import tiny_model_config


def _causal_softmax_reference(q, k, v, allowed_keys):
    """fp64 attention of q [H, N, D] over k, v [H, N, D] restricted to allowed_keys [H, N, N]."""
    logits = (q.double() @ k.double().transpose(1, 2)) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~allowed_keys, float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0) @ v.double()


@pytest.mark.parametrize("num_tokens", [64, 100, 256, 1000])
def test_causal_tile_count_is_s2o_dense_tiles(num_tokens):
    for segment in (64, 256):
        config = s2o.S2OConfig(segment_size=segment, block_m=64, block_n=64)
        shape = (1, 1, num_tokens, 64)
        plan = Plan.for_call(config, shape, shape, is_causal=True)
        assert baselines.causal_tile_count(num_tokens, 64) == plan.dense_tiles()


def test_merged_tile_selections_equal_masked_softmax():
    heads, num_tokens, dim, block = 3, 256, 16, 32
    q, k, v = (torch.randn(heads, num_tokens, dim) for _ in range(3))
    blocks = num_tokens // block
    pos = torch.arange(num_tokens)
    partials = baselines.tile_partials(q / math.sqrt(dim), k, v, pos, pos, block)
    causal = torch.ones(blocks, blocks).tril().bool()
    selections = (torch.rand(4, heads, blocks, blocks) < 0.5) & causal
    selections[:, :, torch.arange(blocks), torch.arange(blocks)] = True  # every row sees a key
    selections[0] = causal  # dense
    out = baselines.merge_tiles(partials, selections)  # [S, H, N, D]
    for s in range(selections.shape[0]):
        keys = selections[s].repeat_interleave(block, 1).repeat_interleave(block, 2)
        allowed = keys & (pos[None, :] <= pos[:, None])
        expected = _causal_softmax_reference(q, k, v, allowed)
        torch.testing.assert_close(out[s].double(), expected, atol=1e-5, rtol=1e-5)


def test_antidiagonal_estimate_matches_a_direct_computation():
    heads, num_tokens, dim, block, stride = 2, 128, 8, 32, 4
    q, k = torch.randn(heads, num_tokens, dim), torch.randn(heads, num_tokens, dim)
    row_start = 64
    probs = baselines.antidiagonal_probs(q[:, row_start:], k, block, 0.5, row_start, stride)
    a_count, b_count = (num_tokens - row_start) // stride, num_tokens // stride
    logits = torch.full((heads, a_count, b_count), float("-inf"))
    for a in range(a_count):
        for b in range(b_count):
            if b <= a + row_start // stride:
                base_q, base_k = row_start + a * stride, b * stride
                terms = [q[:, base_q + stride - 1 - s] * k[:, base_k + s] for s in range(stride)]
                logits[:, a, b] = sum(terms).sum(-1) * 0.5 / stride
    strided = torch.softmax(logits, dim=-1)
    per = block // stride
    expected = strided.view(heads, a_count // per, per, b_count // per, per).sum((2, 4)) / per
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(probs.sum(-1), torch.ones(heads, a_count // per))


def test_selection_rules():
    blocks = torch.arange(4, 8)  # query blocks 4..7 of a chunk, 8 key tiles
    window = baselines.window_selection(blocks, 8, window=2, sink_tiles=1)
    assert window[0].nonzero().flatten().tolist() == [0, 3, 4]
    g = torch.arange(8)
    causal = g[None, :] <= blocks[:, None]
    forced = (g[None, :] == blocks[:, None]) | (g[None, :] == 0)
    scores = torch.randn(2, 4, 8)
    top = baselines.topk_selection(scores, 2, forced, causal)
    assert (top.sum(-1) == forced.sum(-1) + 2).all() and not (top & ~causal).any()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    for tau in (0.3, 0.8, 0.95):
        chosen = baselines.top_cdf_selection(probs, tau, forced, causal)
        assert ((probs * chosen).sum(-1) >= tau - 1e-6).all() and (chosen >= forced).all()
        # Minimal: dropping the smallest non-forced chosen tile falls below tau.
        extra = probs.masked_fill(~chosen | forced, float("inf")).amin(-1)
        covered = (probs * chosen).sum(-1)
        has_extra = torch.isfinite(extra)
        assert (covered[has_extra] - extra[has_extra] < tau + 1e-6).all()


def test_pbs_order_permutes_each_history_segment_by_importance():
    importance = torch.randn(2, 512)
    order = baselines.pbs_segment_order(importance, segment=128, history=384, total=450)
    assert order.shape == (2, 450)
    assert order[:, 384:].tolist() == [list(range(384, 450))] * 2
    for s in range(3):
        part = order[:, s * 128 : (s + 1) * 128]
        assert (part.sort(dim=1).values == torch.arange(s * 128, (s + 1) * 128)).all()
        ranked = importance.gather(1, part)
        assert (ranked[:, :-1] >= ranked[:, 1:]).all()


def test_baselines_at_full_knobs_are_dense_attention():
    q = torch.randn(1, 4, 512, 32)
    k, v = torch.randn(1, 2, 512, 32), torch.randn(1, 2, 512, 32)
    methods = [
        baselines.Method("dense", "dense", "-", (1.0,)),
        baselines.Method("sink+window", "window", "w", (1.0, 8.0)),
        baselines.Method("topk-mean", "topk", "k", (64.0,), estimate="mean"),
        baselines.Method("cdf-antidiag", "cdf", "tau", (2.0,), estimate="antidiag"),
        baselines.Method("pbs", "pbs", "tau", (2.0,), pbs_importance="segment", pbs_segment=128),
        baselines.Method(
            "pbs-l", "pbs", "tau", (2.0,), pbs_importance="last_block", pbs_segment=64
        ),
        baselines.Method("oracle", "oracle", "tau", (2.0,)),
    ]
    result = baselines.evaluate_baselines(
        q, k, v, methods, block=64, out_dtype=torch.float32, chunk_elements=1 << 16
    )
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(result.reference, expected, atol=1e-5, rtol=1e-5)
    points = {(p.method, p.value): p for p in result.points}
    for key, p in points.items():
        if key != ("sink+window", 1.0):
            assert p.density == 1.0 and p.rel_l2 < 1e-5, key
    window = points[("sink+window", 1.0)]  # sink tile + diagonal tile
    assert window.density == pytest.approx((1 + 2 * 7) / 36) and window.rel_l2 > 0.1


def test_curve_matching_recovers_known_ratios():
    def curve(name, factor, densities):
        return [
            baselines.CurvePoint(name, "x", d, d, factor * 1e-3 * d**-2, 0.0) for d in densities
        ]

    s2o_points = curve("s2o", 1.0, [0.05, 0.1, 0.2, 0.4])
    # 4x the error at every density (so 2x the density at every error), plus a dominated point.
    baseline = curve("b", 4.0, [0.04, 0.08, 0.16, 0.32, 0.64])
    baseline.append(baselines.CurvePoint("b", "x", 0.5, 0.5, 1.0, 0.0))
    assert len(matching.pareto_front(baseline)) == 5
    rows = matching.compare_curves(s2o_points, {"b": baseline})
    mine = [r for r in rows if r["baseline"] == "b"]
    for r in mine:
        assert r["mse_ratio"] == pytest.approx(4.0) and r["error_match"] == "in"
    in_range = [r for r in mine if r["density_match"] == "in"]
    assert [r["s2o_density"] for r in in_range] == [0.05, 0.1, 0.2]
    assert all(r["density_ratio"] == pytest.approx(2.0) for r in in_range)
    # s2o's smallest error needs more density than the baseline has: flagged as a lower bound.
    assert mine[-1]["density_match"] == "lower" and mine[-1]["density_ratio"] == 0.64 / 0.4
    summary = {s["baseline"]: s for s in matching.summarise_ratios(rows, floor=0.0)}
    assert summary["b"]["mse_ratio_geomean"] == pytest.approx(4.0)
    assert summary["b"]["density_ratio_geomean"] == pytest.approx(2.0)
    # s2o sparser than any baseline point: out of range, and not an achievable "best".
    sparse = matching.compare_curves(curve("s2o", 1.0, [0.01]), {"b": baseline})
    assert sparse[0]["error_match"] == "sparser"


@pytest.mark.parametrize("score_variance", [0.0, 0.5], ids=["mean", "variance"])
@pytest.mark.parametrize("ordering", ["kv_head", "query_head"])
def test_python_mean_scores_equal_the_op(ordering, score_variance):
    q, k = torch.randn(1, 4, 300, 32), torch.randn(1, 2, 300, 32)
    config = benchmark_config(
        sparse_pass_only=True, segment_size=64, ordering=ordering, score_variance=score_variance
    )
    expected = Plan.for_call(config, q.shape, k.shape, is_causal=True, scale=0.25).estimate(q, k)
    scores = s2o_curve.alternative_scores(q, k, config, "mean", scale=0.25)
    # The op's products are quantised to 12 bits (variance term: 8) of their range, the Python
    # ones exact fp32: they agree to about a level of the largest score (a wrong segment or
    # history would be off by the scores' own size).
    atol = 2e-3 * float(expected.abs().max()) * (4 if score_variance else 1)
    torch.testing.assert_close(scores, expected, atol=atol, rtol=0)
    assert s2o_curve.alternative_scores(q, k, config, "head-max", scale=0.25).shape == scores.shape


def _small_run(tmp_path):
    return [
        "--lengths", "1024",
        "--q-heads", "8",
        "--kv-heads", "2",
        "--head-dim", "64",
        "--thresholds", "0", "0.003", "0.01", "0.03", "0.1", "0.3",
        "--ablation-length", "1024",
        "--ablation-thresholds", "0.01", "0.1",
        "--map-length", "512",
        # At 1024 tokens the default patience (4) rarely stops within the short histories.
        "--s2o-variants", "patience=1",
        "--out", str(tmp_path),
    ]  # fmt: skip


def test_reduced_smoke_run_writes_checked_results(tmp_path, capsys):
    assert quality.main(_small_run(tmp_path)) == 0
    assert "All checks passed." in capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    (length,) = summary["lengths"]
    names = {row["method"] for row in length["curves"]}
    assert {"s2o", "dense", "sink+window", "cdf-antidiag", "pbs-qseg-s256", "oracle"} <= names
    best = next(
        s
        for s in length["ratio_summary"]
        if s["baseline"] == "best" and s["s2o"] == "s2o[patience=1]"
    )
    assert best["points_in_range"] > 0
    for name in ("curves_N1024.png", "attention_map_h0.png", "ablations_N1024.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    assert len(summary["ablations"]) == len(ablations.ablation_variants(group_size=4))


def test_checks_catch_broken_curves():
    def point(method, value, density, mse):
        return baselines.CurvePoint(method, "x", value, density, mse, math.sqrt(mse))

    good = {
        "dense": [point("dense", 1, 1.0, 1e-6)],
        "s2o": [point("s2o", 0, 1.0, 1e-6), point("s2o", 0.1, 0.5, 1e-3)],
        "oracle": [point("oracle", 0.9, 0.3, 1e-2), point("oracle", 0.99, 0.6, 1e-4)],
        "cdf-mean": [point("cdf-mean", 0.9, 0.5, 1e-2), point("cdf-mean", 0.99, 0.8, 1e-3)],
    }
    assert quality.check_curves(good, floor=1e-6) == []
    broken = dict(good, s2o=[point("s2o", 0, 1.0, 1e-6), point("s2o", 0.1, 0.5, 1e-3)])
    broken["s2o"].append(point("s2o", 0.3, 0.8, 1e-5))  # density rises, error falls
    broken["oracle"] = [point("oracle", 0.9, 0.3, 1e-4), point("oracle", 0.99, 0.6, 1e-2)]
    broken["cdf-mean"] = [point("cdf-mean", 0.9, 0.5, 1e-2), point("cdf-mean", 0.99, 0.4, 1e-3)]
    broken["dense"] = [point("dense", 1, 0.9, 1e-6)]
    failures = quality.check_curves(broken, floor=1e-6)
    for expected in ("s2o: density rises", "s2o: MSE falls", "oracle: MSE rises",
                     "cdf-mean: density falls", "dense"):  # fmt: skip
        assert any(expected in f for f in failures), expected
    python_scores = [point("s2o", 0, 1.0, 1e-6), point("s2o", 0.1, 0.6, 1e-3)]
    ablation = {"default: default": good["s2o"], "check: mean": python_scores}
    assert ablations.check_ablations(ablation)
    assert quality.check_files([quality.REPO_ROOT / "no-such-file"])


def _save_tiny_llama(directory):
    """A randomly initialised Llama and a character-level tokenizer saved as a local model."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {
        "[UNK]": 0,
        "<s>": 1,
        **{c: i + 2 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz .")},
    }
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", unk_token="[UNK]"
    ).save_pretrained(directory)
    config = tiny_model_config(
        num_hidden_layers=2, vocab_size=len(vocab), max_position_embeddings=1024
    )
    transformers.LlamaForCausalLM(config).save_pretrained(directory)


def test_reduced_run_on_qkv_captured_from_a_local_model(tmp_path, capsys):
    model_dir, out_dir = tmp_path / "model", tmp_path / "out"
    _save_tiny_llama(model_dir)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. ")
    args = ["--model", str(model_dir), "--text-file", str(text), "--layers", "0", "-1"]
    args += ["--lengths", "600", "--thresholds", "0", "0.01", "0.1", "--ablation-length", "0"]
    args += ["--map-length", "256", "--out", str(out_dir)]
    assert quality.main(args) == 0
    output = capsys.readouterr().out
    assert "layers=[0, 1] N=576" in output  # 600 rounded down to the 64-row tile
    summary = json.loads((out_dir / "summary.json").read_text())
    kinds = {row["heads"] for row in summary["lengths"][0]["mass_shares"]}
    assert kinds == {"layer0", "layer1", "all"}


def test_ablations_skip_variants_the_kernel_rejects(monkeypatch):
    structured = inputs.structured_inputs(512, q_heads=8, kv_heads=2, head_dim=64)
    reference = quality.dense_reference(structured, 64, 1 << 20)
    real_curve = s2o_curve.s2o_curve

    def curve_on_a_kernel_with_fixed_block_n(inputs, reference, thresholds, **kwargs):
        if kwargs.get("block_n", 64) != 64:
            raise RuntimeError("the CUDA kernel takes block_n=64\nmore detail")
        return real_curve(inputs, reference, thresholds, **kwargs)

    monkeypatch.setattr(ablations, "s2o_curve", curve_on_a_kernel_with_fixed_block_n)
    curves, rows = ablations.run_ablations(structured, reference, (0.01, 0.1), floor=1e-7)
    skipped = [row for row in rows if "skipped" in row]
    assert [(row["group"], row["variant"]) for row in skipped] == [
        ("block_n", "32"),
        ("block_n", "128"),
    ]
    assert skipped[0]["skipped"] == "the CUDA kernel takes block_n=64"
    assert len(curves) == len(rows) - 2 and ablations.check_ablations(curves) == []
