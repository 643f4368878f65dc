"""Capture post-RoPE Q, K, V of chosen layers of a Hugging Face causal LM.

How: transformers' attention modules (Llama, Mistral, Qwen2/3, Gemma, ... in transformers >= 4.48)
compute q/k/v, apply their own position embedding (RoPE variant, partial rotary, q/k norms) and
the KV-cache update, and then call the function registered under ``config._attn_implementation``
in ``transformers.AttentionInterface`` with ``(module, query, key, value, attention_mask, ...)``:
query ``[B, Hq, N, D]`` and key/value ``[B, Hkv, N, D]`` exactly as attention sees them. While
capturing, we register a recording wrapper under that same name (so the mask preparation, which
is keyed by the name, is untouched) that copies the tensors of the chosen layers and then calls
the original function, so the forward computes what it always does.

Why not a forward hook on the attention module: the module's inputs are hidden states, and its
q/k/v exist only inside its ``forward``; a hook would have to re-implement every model's
projections, norms and RoPE variant. Models that do not route attention through the interface
(none of the Llama family) are detected: a requested layer that was not seen raises.

``eager`` is not a registered function (models fall back to their module-level
``eager_attention_forward``); the wrapper then calls that function of the module's own modeling
file. Everything is restored on exit, also on error.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch


@dataclass
class CapturedAttention:
    """What one attention layer saw: query [B, Hq, N, D], key/value [B, Hkv, N, D] post-RoPE, as
    the model passes them to attention (the Llama family passes K/V with their own head count),
    and the layer's softmax scale (None: not given, i.e. 1/sqrt(D))."""

    layer: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scale: float | None


class _CaptureComplete(Exception):
    """Raised after the last requested layer to skip the rest of the forward."""


def _num_layers(model) -> int | None:
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "num_hidden_layers", None)


def _resolve_layers(model, layers: Sequence[int]) -> list[int]:
    total = _num_layers(model)
    resolved = []
    for layer in layers:
        if layer < 0:
            if total is None:
                raise ValueError("negative layer indices need config.num_hidden_layers")
            layer += total
        if layer < 0 or (total is not None and layer >= total):
            raise ValueError(f"layer {layer} out of range for a model with {total} layers")
        resolved.append(layer)
    return sorted(set(resolved))


def _eager_function(module):
    """The ``eager_attention_forward`` of the module's own modeling file."""
    function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if function is None:
        raise RuntimeError(
            f"{type(module).__name__}: no eager_attention_forward in {type(module).__module__}; "
            "load the model with attn_implementation='sdpa' to capture it"
        )
    return function


@contextlib.contextmanager
def record_attention(
    model,
    layers: Sequence[int],
    *,
    store_device: str | torch.device | None = "cpu",
    stop_after_last: bool = False,
) -> Iterator[dict[int, CapturedAttention]]:
    """Within the block, forwards of ``model`` record the attention inputs of ``layers`` into the
    yielded dict (layer -> CapturedAttention; tensors detached copies on ``store_device``, None:
    where they are). ``stop_after_last``: the forward raises an internal exception after the last
    requested layer; :func:`capture_attention` catches it.

    Layers are identified by the attention module's ``layer_idx`` (every transformers decoder
    sets it), else by call order within a forward.
    """
    from transformers import AttentionInterface

    wanted = _resolve_layers(model, layers)
    name = model.config._attn_implementation or "eager"
    mapping = AttentionInterface._global_mapping
    had_entry = name in mapping
    original = mapping.get(name)
    captured: dict[int, CapturedAttention] = {}
    calls_without_index = [0]
    own_modules = {id(m) for m in model.modules()}

    def recording_attention(module, query, key, value, *args, **kwargs):
        function = original if original is not None else _eager_function(module)
        if id(module) not in own_modules:  # another model running meanwhile
            return function(module, query, key, value, *args, **kwargs)
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            layer = calls_without_index[0]
            calls_without_index[0] += 1
        if layer in wanted:

            def keep(t: torch.Tensor) -> torch.Tensor:
                t = t.detach()
                return t.to(store_device, copy=True) if store_device is not None else t.clone()

            scale = kwargs.get("scaling", getattr(module, "scaling", None))
            captured[layer] = CapturedAttention(layer, keep(query), keep(key), keep(value), scale)
            if stop_after_last and len(captured) == len(wanted):
                raise _CaptureComplete
        return function(module, query, key, value, *args, **kwargs)

    mapping[name] = recording_attention
    try:
        yield captured
    finally:
        if had_entry:
            mapping[name] = original
        else:
            del mapping[name]


@torch.no_grad()
def capture_attention(
    model,
    input_ids: torch.Tensor,
    layers: Sequence[int],
    *,
    store_device: str | torch.device | None = "cpu",
    stop_after_last: bool = True,
) -> dict[int, CapturedAttention]:
    """One prefill forward of ``input_ids`` [B, N] (no KV cache); returns the post-RoPE attention
    inputs of ``layers`` (negative: from the end). With ``stop_after_last`` the forward stops
    after the last requested layer (no logits are computed)."""
    with record_attention(
        model, layers, store_device=store_device, stop_after_last=stop_after_last
    ) as captured:
        try:
            model(input_ids=input_ids.to(model.device), use_cache=False)
        except _CaptureComplete:
            pass
    missing = sorted(set(_resolve_layers(model, layers)) - set(captured))
    if missing:
        raise RuntimeError(
            f"layers {missing} were not captured: the model does not route attention through "
            "transformers' AttentionInterface"
        )
    return captured


def tokens_of_length(tokenizer, text: str, num_tokens: int) -> torch.Tensor:
    """input_ids [1, num_tokens] of ``text``, the text repeated when it is too short."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the text has no tokens")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    repeats = -(-max(1, num_tokens - len(bos)) // len(ids))
    return torch.tensor([(bos + ids * repeats)[:num_tokens]])


def load_and_capture(
    model_name_or_path: str,
    text: str,
    num_tokens: int,
    layers: Sequence[int],
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    store_device: str | torch.device | None = "cpu",
) -> dict[int, CapturedAttention]:
    """Loads a causal LM and its tokenizer (a local path or a name already in the Hugging Face
    cache) and captures the attention inputs of ``layers`` for ``text`` cut or repeated to
    ``num_tokens`` tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(
        model_name_or_path, dtype=dtype, attn_implementation="sdpa"
    ).to(device)
    model.eval()
    input_ids = tokens_of_length(tokenizer, text, num_tokens)
    return capture_attention(model, input_ids, layers, store_device=store_device)
