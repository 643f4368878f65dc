"""s2o.capture on a small randomly initialised Llama (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch

from .conftest import assert_reproduces_layer_output, tiny_model_config

transformers = pytest.importorskip("transformers")

from s2o.capture import capture_attention, record_attention, tokens_of_length  # noqa: E402

NUM_LAYERS = 3


def _tiny_llama(attn_implementation: str):
    config = tiny_model_config(
        hidden_size=64,
        num_hidden_layers=NUM_LAYERS,
        vocab_size=101,
        max_position_embeddings=256,
        attn_implementation=attn_implementation,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _attention_outputs(model) -> tuple[dict[int, torch.Tensor], list]:
    """Forward hooks keeping each layer's attention-module output (after o_proj)."""
    outputs = {}
    handles = [
        layer.self_attn.register_forward_hook(
            lambda module, args, out, i=i: outputs.__setitem__(i, out[0].detach())
        )
        for i, layer in enumerate(model.model.layers)
    ]
    return outputs, handles


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_captured_qkv_reproduce_the_layer_output(attn_implementation):
    model = _tiny_llama(attn_implementation)
    input_ids = torch.randint(0, 101, (2, 37))
    outputs, handles = _attention_outputs(model)
    captured = capture_attention(model, input_ids, [0, -1], stop_after_last=False)
    for handle in handles:
        handle.remove()

    assert sorted(captured) == [0, NUM_LAYERS - 1]
    for layer, c in captured.items():
        assert c.query.shape == (2, 4, 37, 16)
        assert c.key.shape == c.value.shape == (2, 2, 37, 16)
        assert c.scale == pytest.approx(16**-0.5)
        assert_reproduces_layer_output(model, layer, c, outputs[layer], rtol=1e-5)


def test_query_and_key_are_post_rope():
    model = _tiny_llama("sdpa")
    pre_rope = {}
    attn = model.model.layers[1].self_attn
    handles = [
        attn.q_proj.register_forward_hook(lambda m, a, out: pre_rope.__setitem__("q", out)),
        attn.k_proj.register_forward_hook(lambda m, a, out: pre_rope.__setitem__("k", out)),
    ]
    captured = capture_attention(model, torch.randint(0, 101, (1, 20)), [1])[1]
    for handle in handles:
        handle.remove()
    for name, tensor in (("q", captured.query), ("k", captured.key)):
        before = pre_rope[name].view(1, 20, -1, 16).transpose(1, 2)
        # RoPE is the identity at position 0 and a rotation (same norm) elsewhere.
        torch.testing.assert_close(tensor[:, :, 0], before[:, :, 0])
        torch.testing.assert_close(tensor.norm(dim=-1), before.norm(dim=-1))
        assert not torch.allclose(tensor[:, :, 1:], before[:, :, 1:], atol=1e-3)


def test_stop_after_last_skips_later_layers_and_restores_the_interface():
    model = _tiny_llama("sdpa")
    mapping = dict(transformers.AttentionInterface._global_mapping)
    outputs, handles = _attention_outputs(model)
    captured = capture_attention(model, torch.randint(0, 101, (1, 16)), [0])
    for handle in handles:
        handle.remove()
    assert list(captured) == [0]
    assert outputs == {}  # the forward stopped inside layer 0's attention
    assert transformers.AttentionInterface._global_mapping == mapping


def test_interface_is_restored_after_an_error():
    model = _tiny_llama("eager")
    mapping = dict(transformers.AttentionInterface._global_mapping)
    with pytest.raises(ZeroDivisionError):
        with record_attention(model, [0]):
            assert "eager" in transformers.AttentionInterface._global_mapping
            1 / 0  # noqa: B018
    assert transformers.AttentionInterface._global_mapping == mapping


def test_layers_that_are_not_seen_raise():
    model = _tiny_llama("sdpa")
    with pytest.raises(ValueError, match="out of range"):
        capture_attention(model, torch.randint(0, 101, (1, 8)), [NUM_LAYERS])
    # An attention module that bypasses transformers' AttentionInterface.
    model.model.layers[1].self_attn.forward = lambda hidden_states, **kwargs: (
        torch.zeros_like(hidden_states),
        None,
    )
    with pytest.raises(RuntimeError, match=r"layers \[1\] were not captured"):
        capture_attention(model, torch.randint(0, 101, (1, 8)), [0, 1])


def test_tokens_of_length_repeats_short_texts():
    class Tokenizer:
        bos_token_id = 7

        def __call__(self, text, add_special_tokens):
            return {"input_ids": [ord(c) for c in text]}

    ids = tokens_of_length(Tokenizer(), "abc", 10)
    assert ids.tolist() == [[7, 97, 98, 99, 97, 98, 99, 97, 98, 99]]
    assert tokens_of_length(Tokenizer(), "abcdefgh", 4).tolist() == [[7, 97, 98, 99]]
