"""The quality benchmark's inputs: structured data or Q/K/V captured from a model, with the
attention statistics of their heads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from s2o import data


@dataclass
class Inputs:
    """Q/K/V of one benchmark case: query [B, Hq, N, D], key/value [B, Hkv, N, D]; head_kinds
    labels each query head (head type, or layer for captured inputs)."""

    name: str
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scale: float | None
    head_kinds: list[str]

    @property
    def length(self) -> int:
        return self.query.shape[2]


def structured_inputs(
    length: int,
    *,
    q_heads: int = 32,
    kv_heads: int = 8,
    head_dim: int = 128,
    kv_groups: list[int] | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> Inputs:
    """s2o.data.structured_qkv in bf16, optionally only the KV groups ``kv_groups`` (with their
    query heads): the head types of the full shape are kept."""
    q, k, v = data.structured_qkv(
        length, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, seed=seed, device=device
    )
    kinds = [p.kind for p in data.head_profiles(q_heads, seed)]
    if kv_groups is not None:
        group = q_heads // kv_heads
        heads = [g * group + i for g in kv_groups for i in range(group)]
        q, k, v = q[:, heads], k[:, kv_groups], v[:, kv_groups]
        kinds = [kinds[h] for h in heads]
    name = f"structured N={length} Hq={q.shape[1]} Hkv={k.shape[1]} D={head_dim} seed={seed}"
    return Inputs(name, q.contiguous(), k.contiguous(), v.contiguous(), None, kinds)


def captured_inputs(
    model: str, text_file: str, length: int, layers: list[int], device: str, block: int
) -> Inputs:
    """Q/K/V of ``layers`` of a local Hugging Face causal LM for the text (repeated or cut to
    ``length`` tokens, rounded down to a multiple of ``block``); the layers are stacked as more
    heads (each layer keeps its GQA groups)."""
    from s2o.capture import load_and_capture

    length = length // block * block
    text = Path(text_file).read_text()
    captured = load_and_capture(model, text, length, layers, device=device, store_device=device)
    parts = [captured[layer] for layer in sorted(captured)]
    scales = {c.scale for c in parts}
    if len(scales) > 1:
        raise ValueError(f"captured layers use different softmax scales {scales}")
    q = torch.cat([c.query for c in parts], dim=1)
    k = torch.cat([c.key for c in parts], dim=1)
    v = torch.cat([c.value for c in parts], dim=1)
    kinds = [f"layer{c.layer}" for c in parts for _ in range(c.query.shape[1])]
    name = f"{Path(model).name} layers={sorted(captured)} N={length}"
    return Inputs(name, q.contiguous(), k.contiguous(), v.contiguous(), scales.pop(), kinds)


def mass_stats(inputs: Inputs) -> list[dict]:
    """Share of softmax mass in the top 1/3/10% of keys (last 64 rows), mean per head kind."""
    shares = data.attention_mass_stats(inputs.query, inputs.key).cpu()  # [Hq, 3]
    rows = []
    for kind in sorted(set(inputs.head_kinds)):
        heads = [h for h, k in enumerate(inputs.head_kinds) if k == kind]
        mean = shares[heads].mean(dim=0).tolist()
        rows.append(
            {
                "heads": kind,
                "count": len(heads),
                "top1%": mean[0],
                "top3%": mean[1],
                "top10%": mean[2],
            }
        )
    mean = shares.mean(dim=0).tolist()
    rows.append(
        {
            "heads": "all",
            "count": len(inputs.head_kinds),
            "top1%": mean[0],
            "top3%": mean[1],
            "top10%": mean[2],
        }
    )
    return rows
