"""The trained model end to end on the CPU: SmolLM2-135M-Instruct (s2o.models) on real text
(s2o.texts), dense SDPA against s2o inside the model. The model is loaded once for the module."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import s2o
from s2o import models, texts

from .conftest import assert_reproduces_layer_output

_MISSING = models.missing_packages()
if _MISSING:
    pytest.skip(
        f"SmolLM2 needs {', '.join(_MISSING)} (not installed): {models.INSTALL_COMMAND}",
        allow_module_level=True,
    )

from s2o.capture import capture_attention  # noqa: E402
from s2o.integrations.transformers import record_stats  # noqa: E402

# Bound on each layer's relative L2 attention error at 2K (prose, default config with
# min_keys=0), over all rows and heads of the layer against fp32 SDPA on the captured Q/K/V.
# Measured at the defaults (query_head ordering, threshold 0.003, patience 4, budget 10%): worst
# layer 0.0010 (layer 4), mean 0.0004, mean density 0.924, worst head 0.36%. With the ranking
# pooled per KV head (ordering="kv_head") layer 19 reaches 0.0256 (one head at 5.8%).
LAYER_ERROR_BOUND = 0.01


@pytest.fixture(scope="module")
def smollm2():
    return models.load_smollm2(dtype=torch.float32)


@pytest.fixture(scope="module")
def prose() -> str:
    return texts.load_text("prose")


def test_loads_smollm2(smollm2):
    model, tokenizer = smollm2
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert config.model_type == "llama"
    assert config._attn_implementation == "sdpa"
    assert (config.num_hidden_layers, config.num_attention_heads) == (30, 9)
    assert config.num_key_value_heads == 3
    assert config.hidden_size // config.num_attention_heads == 64
    assert getattr(config, "head_dim", 64) == 64
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer("hello world")["input_ids"]


def test_missing_package_names_it_and_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "gguf" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert models.missing_packages() == ["gguf"]
    with pytest.raises(models.ModelUnavailableError) as info:
        models.load_smollm2()
    assert isinstance(info.value, ImportError)
    assert "gguf" in str(info.value)
    assert models.INSTALL_COMMAND in str(info.value)


def test_captured_layer_reproduces_sdpa(smollm2, prose):
    model, tokenizer = smollm2
    ids = texts.text_input_ids(tokenizer, prose, 512)
    layers = [0, 14, 29]
    outputs = {}
    handles = [
        model.model.layers[i].self_attn.register_forward_hook(
            lambda module, args, out, i=i: outputs.__setitem__(i, out[0].detach())
        )
        for i in layers
    ]
    try:
        captured = capture_attention(model, ids, layers, stop_after_last=False)
    finally:
        for handle in handles:
            handle.remove()
    for i in layers:
        c = captured[i]
        assert c.query.shape == (1, 9, 512, 64)
        assert c.key.shape == c.value.shape == (1, 3, 512, 64)
        assert c.scale == pytest.approx(64**-0.5)
        assert_reproduces_layer_output(model, i, c, outputs[i], rtol=1e-4)


@torch.no_grad()
def test_exact_s2o_reproduces_the_dense_logits(smollm2, prose):
    model, tokenizer = smollm2
    ids = texts.text_input_ids(tokenizer, prose, 1024)
    dense = model(input_ids=ids, use_cache=False).logits
    config = s2o.S2OConfig(threshold=0, min_keys=0)
    with s2o.patch_llama(model, config), record_stats() as recorder:
        sparse = model(input_ids=ids, use_cache=False).logits
    assert model.config._attn_implementation == "sdpa"  # undone
    assert len(recorder.sparse_calls) == model.config.num_hidden_layers
    assert not recorder.dense_calls
    assert all(call.stats.density == 1.0 for call in recorder.sparse_calls)
    # fp32 all the way; the two differ only in the order of the softmax sums.
    # Measured: max |difference| 7.2e-5 over logits of magnitude up to 42.
    torch.testing.assert_close(sparse, dense, atol=2e-3, rtol=0)


def test_layer_errors_at_2k_stay_bounded(smollm2, prose):
    model, tokenizer = smollm2
    num_layers = model.config.num_hidden_layers
    ids = texts.text_input_ids(tokenizer, prose, 2048)
    captured = capture_attention(model, ids, list(range(num_layers)))
    config = s2o.S2OConfig(min_keys=0)
    errors, densities = [], []
    for layer in range(num_layers):
        c = captured[layer]
        reference = F.scaled_dot_product_attention(
            c.query, c.key, c.value, is_causal=True, enable_gqa=True, scale=c.scale
        )
        out, stats = s2o.attention(
            c.query, c.key, c.value, is_causal=True, scale=c.scale, enable_gqa=True,
            config=config, return_stats=True,
        )  # fmt: skip
        assert stats.path == "sparse"
        errors.append(((out - reference).norm() / reference.norm()).item())
        densities.append(stats.density)
    worst = max(range(num_layers), key=errors.__getitem__)
    assert errors[worst] < LAYER_ERROR_BOUND, (
        f"layer {worst}: relative L2 error {errors[worst]:.4f} >= {LAYER_ERROR_BOUND}; "
        f"all: {[round(e, 4) for e in errors]}"
    )
    # The stop rule did skip tiles: not a dense run in disguise (measured mean density 0.92).
    assert sum(densities) / num_layers < 0.98
