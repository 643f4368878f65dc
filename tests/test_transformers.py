"""The transformers integration: attn_implementation="s2o", its routes, stats and patch_llama.

A small randomly initialised Llama (GQA: 4 query heads, 2 KV heads) in fp32 on CPU, compared with
the same weights under attn_implementation="sdpa". Configs use min_keys=1 and segment_size=64, so
prompts of a few hundred tokens take the sparse path over several segments.
"""

import pytest
import torch

from .conftest import tiny_model_config

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402
from transformers.masking_utils import (  # noqa: E402
    ALL_MASK_ATTENTION_FUNCTIONS,
    causal_mask_function,
    sdpa_mask,
    sliding_window_causal_mask_function,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

import s2o  # noqa: E402
from s2o import S2OConfig, S2OFallbackError  # noqa: E402
from s2o.integrations import transformers as s2o_hf  # noqa: E402

EXACT = S2OConfig(threshold=0.0, min_keys=1, segment_size=64)
EXACT_STRICT = S2OConfig(threshold=0.0, min_keys=1, segment_size=64, strict=True)
NUM_LAYERS = 4
VOCAB = 1000
# Logits of s2o at threshold 0 vs sdpa: both fp32, summed in a different order.
ATOL, RTOL = 1e-4, 1e-4


def _model_config(kind="llama"):
    return tiny_model_config(kind, num_hidden_layers=NUM_LAYERS, vocab_size=VOCAB)


def _models(*implementations, kind="llama"):
    """One freshly initialised model per implementation, all with the same weights, in eval.
    Each gets its own config object: from_config sets the implementation on the one it is given."""
    first = AutoModelForCausalLM.from_config(
        _model_config(kind), attn_implementation=implementations[0]
    )
    models = [first.eval()]
    for implementation in implementations[1:]:
        model = AutoModelForCausalLM.from_config(
            _model_config(kind), attn_implementation=implementation
        )
        model.load_state_dict(first.state_dict())
        models.append(model.eval())
    return models


def _prompt(length, batch=1):
    return torch.randint(0, VOCAB, (batch, length))


@pytest.fixture(autouse=True)
def _restore_default_config():
    previous = s2o_hf.set_config(EXACT)
    yield
    s2o_hf.set_config(previous)


def test_s2o_is_registered_for_from_pretrained_and_set_attn_implementation(tmp_path):
    assert ALL_ATTENTION_FUNCTIONS["s2o"] is s2o_hf.s2o_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["s2o"] is s2o_hf.s2o_mask
    (model,) = _models("sdpa")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="s2o").eval()
    model.set_attn_implementation("s2o")
    for switched in (model, loaded):
        assert switched.config._attn_implementation == "s2o"
        with s2o_hf.record_stats() as recorder, torch.no_grad():
            switched(_prompt(100))
        assert len(recorder.sparse_calls) == NUM_LAYERS


def _prefill_matches_sdpa(length: int) -> s2o_hf.AttentionRecorder:
    """One prefill of a random prompt of ``length`` tokens with s2o and with sdpa (same weights):
    asserts that the logits match, returns what the s2o calls recorded."""
    s2o_model, sdpa_model = _models("s2o", "sdpa")
    prompt = _prompt(length)
    with s2o_hf.record_stats() as recorder, torch.no_grad():
        logits = s2o_model(prompt).logits
        expected = sdpa_model(prompt).logits
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=RTOL)
    return recorder


def test_prefill_logits_match_sdpa_at_threshold_zero():
    s2o_hf.set_config(EXACT_STRICT)  # any dense fallback would raise
    recorder = _prefill_matches_sdpa(300)
    assert [call.path for call in recorder.calls] == ["sparse"] * NUM_LAYERS
    assert [call.layer_idx for call in recorder.calls] == list(range(NUM_LAYERS))
    assert all(call.num_queries == call.num_keys == 300 for call in recorder.calls)
    assert recorder.density() == pytest.approx(1.0)  # threshold 0 visits every tile


def test_greedy_generation_matches_sdpa_at_threshold_zero():
    s2o_model, sdpa_model = _models("s2o", "sdpa")
    prompt = _prompt(150)  # more than two segments
    generate = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    with s2o_hf.record_stats() as recorder, torch.no_grad():
        tokens = s2o_model.generate(prompt, **generate)
    with torch.no_grad():
        expected = sdpa_model.generate(prompt, **generate)
    assert tokens.shape == (1, 150 + 24)
    assert torch.equal(tokens, expected)
    # Prefill sparse in every layer; the 23 decode steps dense by design.
    assert len(recorder.sparse_calls) == NUM_LAYERS
    assert recorder.dense_reasons() == {"decode": 23 * NUM_LAYERS}


def test_short_prompts_take_the_dense_route():
    s2o_hf.set_config(S2OConfig())  # the default min_keys (16384): a 100-token prompt is short
    recorder = _prefill_matches_sdpa(100)
    assert recorder.dense_reasons() == {"short": NUM_LAYERS}


def test_threshold_reports_density_and_early_stopping_reaches_the_model():
    (model,) = _models("s2o")
    prompt = _prompt(600)
    with torch.no_grad():
        exact = model(prompt).logits
        s2o_hf.set_config(S2OConfig(threshold=0.05, min_keys=1, segment_size=64))
        with s2o_hf.record_stats() as default_like:
            model(prompt)
        # No error budget: it would recompute these heads exactly (their error is far above it).
        s2o_hf.set_config(
            S2OConfig(
                threshold=0.5, tail_threshold=None, min_keys=1, segment_size=64, error_budget=None
            )
        )
        with s2o_hf.record_stats() as loose:
            stopped = model(prompt).logits
    for recorder in (default_like, loose):
        assert len(recorder.sparse_calls) == NUM_LAYERS
        assert 0.0 < recorder.density() <= 1.0
        assert f"{NUM_LAYERS} sparse (density" in recorder.summary()
        stats = recorder.calls[0].stats
        assert set(stats.time_ms) == {"estimate", "permute", "attend", "check"}
    # Random weights give flat attention, so only a loose threshold stops early here.
    assert loose.density() < 0.9
    assert not torch.allclose(stopped, exact, atol=1e-3)


# `past_key_values` is the argument's name in 5.17, deprecated for `cache` in 5.24.
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
def test_chunked_prefill_below_min_keys_goes_dense_bottom_right():
    # The package default sends these short calls to dense SDPA; the second chunk's 130 queries
    # must sit at the end of its 330 keys there too (SDPA's own is_causal is top-left).
    s2o_hf.set_config(None)
    s2o_model, sdpa_model = _models("s2o", "sdpa")
    prompt = _prompt(330)
    cache = DynamicCache(config=s2o_model.config)
    with s2o_hf.record_stats() as recorder, torch.no_grad():
        s2o_model(prompt[:, :200], past_key_values=cache, use_cache=True)
        chunked = s2o_model(prompt[:, 200:], past_key_values=cache, use_cache=True).logits
        expected = sdpa_model(prompt).logits[:, 200:]
    torch.testing.assert_close(chunked, expected, atol=ATOL, rtol=RTOL)
    assert recorder.dense_reasons() == {"short": 2 * NUM_LAYERS}


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
def test_chunked_prefill_with_dynamic_cache_matches_one_shot():
    s2o_hf.set_config(EXACT_STRICT)
    (model,) = _models("s2o")
    prompt = _prompt(330)
    first, second = prompt[:, :200], prompt[:, 200:]
    cache = DynamicCache(config=model.config)
    with s2o_hf.record_stats() as recorder, torch.no_grad():
        one_shot = model(prompt).logits
        model(first, past_key_values=cache, use_cache=True)
        chunked = model(second, past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(chunked, one_shot[:, 200:], atol=ATOL, rtol=RTOL)
    # The second chunk ran sparse with its 130 queries at the end of 330 keys (bottom-right).
    second_chunk = recorder.calls[2 * NUM_LAYERS :]
    assert [(c.path, c.num_queries, c.num_keys) for c in second_chunk] == [
        ("sparse", 130, 330)
    ] * NUM_LAYERS


@pytest.mark.parametrize(
    "kind, implementation", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa")]
)
def test_patch_llama_routes_through_s2o_and_undo_restores_exactly(kind, implementation):
    model, s2o_model = _models(implementation, "s2o", kind=kind)
    prompt = _prompt(300)
    # Patience 1 and no error budget: the short histories would not stop otherwise, and the
    # budget would recompute the loose heads; both would hide the patch's effect.
    loose = S2OConfig(
        threshold=0.5, patience=1, tail_threshold=None, min_keys=1, segment_size=64,
        error_budget=None,
    )  # fmt: skip
    with torch.no_grad():
        original = model(prompt).logits
        handle = s2o.patch_llama(model, loose)
        assert model.config._attn_implementation == "s2o"
        with s2o_hf.record_stats() as recorder:
            patched = model(prompt).logits
        handle.undo()
        handle.undo()  # a second undo does nothing
        restored = model(prompt).logits
        with s2o.patch_llama(model, EXACT):
            exact = model(prompt).logits
        after_context = model(prompt).logits
        s2o_hf.set_config(loose)
        expected_patched = s2o_model(prompt).logits
    assert len(recorder.sparse_calls) == NUM_LAYERS
    assert torch.equal(patched, expected_patched)  # the patch's config, not the default, was used
    assert not torch.allclose(patched, original, atol=1e-3)
    torch.testing.assert_close(exact, original, atol=ATOL, rtol=RTOL)
    assert model.config._attn_implementation == implementation
    assert not any(hasattr(module, "_s2o_config") for module in model.modules())
    assert torch.equal(restored, original)
    assert torch.equal(after_context, original)


def test_patch_llama_rejects_what_it_cannot_patch():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        s2o.patch_llama(torch.nn.Linear(2, 2))
    (model,) = _models("sdpa")
    with pytest.raises(TypeError, match="S2OConfig"):
        s2o.patch_llama(model, config={"threshold": 0.0})


def _padded_batch(side):
    prompt = _prompt(260, batch=3)
    attention_mask = torch.ones_like(prompt)
    if side == "left":
        attention_mask[1, :70] = 0  # row 1: 70 pad tokens on the left
        attention_mask[2, :200] = 0
    else:
        attention_mask[1, 190:] = 0
        attention_mask[2, 60:] = 0
    return prompt, attention_mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_takes_the_sparse_route_and_matches_each_sequence_alone(side):
    # The prefill is unpadded into one varlen call (every sequence sparse); decode stays dense.
    s2o_hf.set_config(S2OConfig(min_keys=1, segment_size=64, strict=True))
    s2o_model, sdpa_model = _models("s2o", "sdpa")
    prompt, attention_mask = _padded_batch(side)
    with s2o_hf.record_stats() as recorder, torch.no_grad():
        logits = s2o_model(prompt, attention_mask=attention_mask).logits
    assert recorder.dense_reasons() == {}
    assert [c.num_keys for c in recorder.sparse_calls[:3]] == attention_mask.sum(1).tolist()
    real = attention_mask.bool()  # pad positions' outputs are meaningless
    for row in range(prompt.shape[0]):
        alone = prompt[row : row + 1, real[row]]
        with torch.no_grad():
            expected = s2o_model(alone).logits[0]  # the same sequence, unpadded, alone
            dense = sdpa_model(alone).logits[0]
        torch.testing.assert_close(logits[row, real[row]], expected, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(logits[row, real[row]], dense, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_prefill_reads_its_ranges_from_the_padding_mask(side, monkeypatch):
    """s2o_mask reads a padded prefill's sequences from the [B, kv] padding mask once and hands
    them to every layer with the mask; they agree with what the host check of the [B, 1, Nq, Nk]
    mask finds, which no layer then runs."""
    prompt, attention_mask = _padded_batch(side)
    n = prompt.shape[1]
    mask = s2o_hf.s2o_mask(prompt.shape[0], n, n, attention_mask=attention_mask.bool())
    assert mask._s2o_padded_ranges == s2o_hf._padded_causal_ranges(mask, n, n)
    # Without padding or beyond prefill there is nothing to attach.
    assert s2o_hf._padding_ranges(causal_mask_function, None, None, n, n, 0, 0) is None
    decode = s2o_hf.s2o_mask(3, 1, n, q_offset=n - 1, attention_mask=attention_mask.bool())
    assert not hasattr(decode, "_s2o_padded_ranges")

    s2o_hf.set_config(S2OConfig(min_keys=1, segment_size=64, strict=True))
    (s2o_model,) = _models("s2o")
    checks = []
    original = s2o_hf._padded_causal_ranges
    monkeypatch.setattr(
        s2o_hf, "_padded_causal_ranges", lambda *a: checks.append(1) or original(*a)
    )
    with s2o_hf.record_stats() as recorder, torch.no_grad():
        s2o_model(prompt, attention_mask=attention_mask)
    assert recorder.dense_reasons() == {} and recorder.sparse_calls
    assert checks == []


def test_left_padded_generation_matches_sdpa():
    s2o_model, sdpa_model = _models("s2o", "sdpa")
    prompt, attention_mask = _padded_batch("left")
    generate = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with s2o_hf.record_stats() as recorder, torch.no_grad():
        logits = s2o_model(prompt, attention_mask=attention_mask).logits
        tokens = s2o_model.generate(prompt, attention_mask=attention_mask, **generate)
    with torch.no_grad():
        expected = sdpa_model(prompt, attention_mask=attention_mask).logits
        expected_tokens = sdpa_model.generate(prompt, attention_mask=attention_mask, **generate)
    real = attention_mask.bool()
    torch.testing.assert_close(logits[real], expected[real], atol=ATOL, rtol=RTOL)
    assert torch.equal(tokens, expected_tokens)
    # Two prefills of 3 sequences each (the forward and generate's), sparse; decode steps dense.
    assert len(recorder.sparse_calls) == 2 * 3 * NUM_LAYERS
    assert recorder.dense_reasons() == {"decode": 5 * NUM_LAYERS}


def test_strict_mode_raises_on_a_mask_that_is_not_padding():
    s2o_hf.set_config(EXACT_STRICT)
    (model,) = _models("s2o")
    prompt, attention_mask = _padded_batch("left")
    attention_mask[0, 100:120] = 0  # a hole in the middle: not one sequence per row
    with pytest.raises(S2OFallbackError, match="attn_mask"), torch.no_grad():
        model(prompt, attention_mask=attention_mask)


def test_static_cache_generation_takes_the_mask_route_and_matches_sdpa():
    # A static cache's key buffer runs past the prompt: not bottom-right causal, so s2o_mask must
    # materialise the mask (sdpa's own skip relies on top-left is_causal and cutting the keys).
    s2o_model, sdpa_model = _models("s2o", "sdpa")
    prompt = _prompt(130)
    generate = dict(
        max_new_tokens=8,
        min_new_tokens=8,
        do_sample=False,
        pad_token_id=0,
        cache_implementation="static",
    )
    with s2o_hf.record_stats() as recorder, torch.no_grad():
        tokens = s2o_model.generate(prompt, **generate)
    with torch.no_grad():
        expected = sdpa_model.generate(prompt, **generate)
    assert torch.equal(tokens, expected)
    assert recorder.dense_reasons()["attn_mask"] == NUM_LAYERS


class _AttentionModule(torch.nn.Module):
    is_causal = True
    layer_idx = 0


@pytest.mark.parametrize("mask_heads", [None, 1, 4])
def test_decode_route_matches_sdpa_and_returns_the_sdpa_layout(mask_heads):
    # One query row over 90 cached keys, GQA 4:2, no mask / a padding mask shared by the heads /
    # one per query head.
    query = torch.randn(3, 4, 1, 32)
    key, value = torch.randn(3, 2, 90, 32), torch.randn(3, 2, 90, 32)
    mask = None
    if mask_heads is not None:
        mask = torch.rand(3, mask_heads, 1, 90) > 0.3
        mask[..., -1] = True
    with s2o_hf.record_stats() as recorder:
        out, weights = s2o_hf.s2o_attention_forward(
            _AttentionModule(), query, key, value, mask, scaling=0.2
        )
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1), mask, scale=0.2
    )
    assert weights is None
    assert out.shape == (3, 1, 4, 32) and out.is_contiguous()
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=2e-5, rtol=2e-5)
    assert [(c.path, c.reason, c.layer_idx) for c in recorder.calls] == [("dense", "decode", 0)]


def _mask_args(**overrides):
    args = dict(batch_size=2, q_length=50, kv_length=50, q_offset=0, kv_offset=0)
    return {**args, **overrides}


@pytest.mark.parametrize(
    "case, overrides, skipped",
    [
        ("prefill", {}, True),
        ("chunked prefill", dict(q_offset=80, kv_length=130), True),
        ("decode", dict(q_length=1, q_offset=129, kv_length=130), True),
        ("no padding in the mask", dict(attention_mask=torch.ones(2, 50, dtype=torch.bool)), True),
        ("left padding", dict(attention_mask=torch.arange(50).expand(2, 50) >= 20), False),
        ("static cache", dict(kv_length=256), False),
        ("sliding window", dict(mask_function=sliding_window_causal_mask_function(8)), False),
        ("window size given", dict(local_size=8), False),
        ("skip not allowed", dict(allow_is_causal_skip=False), False),
        ("offset tensor", dict(q_offset=torch.tensor(0)), False),
    ],
)
def test_mask_function_skips_only_plain_bottom_right_causal(case, overrides, skipped):
    args = _mask_args(**overrides)
    mask = s2o_hf.s2o_mask(**args)
    if skipped:
        assert mask is None, case
        return
    expected = sdpa_mask(**{**args, "allow_is_causal_skip": False})
    assert mask is not None and torch.equal(mask, expected), case


def test_mask_function_keeps_the_causal_pattern_it_is_given():
    mask = s2o_hf.s2o_mask(**_mask_args(kv_length=256))
    assert mask.shape == (2, 1, 50, 256)
    assert torch.equal(mask[0, 0], torch.ones(50, 256, dtype=torch.bool).tril())
    assert s2o_hf.s2o_mask(**_mask_args(), mask_function=causal_mask_function) is None


def test_set_config_checks_its_argument_and_forces_bottom_right():
    with pytest.raises(TypeError, match="S2OConfig"):
        s2o_hf.set_config({"threshold": 0.0})
    s2o_hf.set_config(S2OConfig(threshold=0.2, causal_alignment="top_left"))
    assert s2o_hf.get_config().causal_alignment == "bottom_right"
    assert s2o_hf.get_config().threshold == 0.2
    s2o_hf.set_config(None)
    assert s2o_hf.get_config() == S2OConfig(causal_alignment="bottom_right")


def test_transformers_outside_the_supported_range_is_refused_at_import():
    """An older transformers crashed inside the mask function; now the import says what to
    install."""
    import subprocess
    import sys

    script = (
        "import transformers; transformers.__version__ = '5.10.0'; "
        "import s2o.integrations.transformers"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode != 0
    assert "needs transformers>=5.17,<6" in run.stderr and "found 5.10.0" in run.stderr
