"""Shared fixtures: devices, per-dtype tolerances, input builders with fresh random data, and small
transformers models."""

from __future__ import annotations

import dataclasses
import zlib

import pytest
import torch
import torch.nn.functional as F

from s2o.layout import SegmentLayout
from s2o.plan import Plan

HAS_CUDA_KERNELS = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "s2o::sparse_attention", "CUDA"
)

# (atol, rtol) for outputs of a kernel that computes in fp32 from inputs of this dtype, against the
# fp32 reference on the same inputs: the error is the rounding of the output to the dtype.
TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (3e-3, 3e-3),
}


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU and s2o's CUDA kernels")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA_KERNELS:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different seed per test case (from its id), so inputs are fresh for every case but a
    # failure reproduces.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@dataclasses.dataclass(frozen=True)
class Case:
    """One shape and parameter combination of the test grid."""

    batch: int
    q_heads: int
    kv_heads: int
    num_queries: int
    num_keys: int
    head_dim: int
    segment_size: int
    block_m: int
    block_n: int
    q_offset: int = 0
    is_causal: bool = True

    @property
    def id(self) -> str:
        causal = ("br" if self.q_offset else "tl") if self.is_causal else "nc"
        return (
            f"b{self.batch}h{self.q_heads}-{self.kv_heads}q{self.num_queries}k{self.num_keys}"
            f"d{self.head_dim}s{self.segment_size}m{self.block_m}n{self.block_n}{causal}"
        )


# Lengths deliberately not multiples of the tile or segment sizes.
CPU_CASES = [
    Case(1, 4, 4, 300, 300, 64, 64, 16, 32),  # MHA
    Case(2, 8, 2, 257, 257, 128, 64, 32, 64),  # GQA, batch 2, D 128
    Case(1, 6, 1, 200, 333, 64, 48, 16, 32, q_offset=133),  # MQA, bottom-right causal
    Case(1, 4, 2, 150, 400, 32, 32, 16, 24),  # top-left causal with Nq < Nk
    Case(1, 4, 2, 300, 200, 64, 64, 16, 32),  # top-left causal with Nq > Nk
    Case(1, 4, 2, 190, 260, 64, 64, 32, 64, is_causal=False),  # no mask
    Case(1, 2, 1, 40, 40, 64, 64, 64, 64),  # shorter than one segment and one tile
    Case(2, 3, 3, 7, 9, 16, 4, 2, 3, q_offset=2),  # tiny
]


def make_qkv(case: Case, dtype=torch.float32, device="cpu", contiguous=True, peaky=False):
    """Fresh random q [B, Hq, Nq, D], k, v [B, Hkv, Nk, D]; non-contiguous ones are transposed
    views of [B, N, H, D] tensors (the layout Hugging Face models produce).

    ``peaky``: every query also carries a direction u of its KV group and a few keys carry u
    strongly (up to ~18 logits), so attention concentrates on keys the ranking can find and early
    stopping triggers even at these small sizes.
    """
    b, d, group = case.batch, case.head_dim, case.q_heads // case.kv_heads

    def make(heads, n):
        if contiguous:
            return torch.randn(b, heads, n, d)
        return torch.randn(b, n, heads, d).transpose(1, 2)

    q, k, v = (
        make(case.q_heads, case.num_queries),
        make(case.kv_heads, case.num_keys),
        make(case.kv_heads, case.num_keys),
    )
    if peaky:
        u = torch.randn(b, case.kv_heads, 1, d)
        u = u / u.norm(dim=-1, keepdim=True) * d**0.25
        q += 3.0 * u.repeat_interleave(group, dim=1)
        k += 6.0 * torch.rand(b, case.kv_heads, case.num_keys, 1) ** 8 * u
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


# (order_per_kv_head, group_units): one ranking per KV head with the G heads of a group as one
# unit, one ranking per KV head with a unit per query head, one ranking per query head.
MODES = {"kvgroup": (True, True), "kvhead": (True, False), "qhead": (False, False)}


def runs_wgmma_kernel() -> bool:
    """Whether this GPU runs the wgmma attention kernel (compute capability 9.0)."""
    return torch.cuda.get_device_capability() == (9, 0)


def case_layout(case: Case) -> SegmentLayout:
    return SegmentLayout(
        case.num_queries, case.num_keys, case.segment_size, case.q_offset, case.is_causal
    )


def make_plan(
    layout: SegmentLayout,
    *,
    block_m=16,
    block_n=16,
    order_per_kv_head=True,
    group_units=False,
    threshold=0.0,
    patience=1,
    tail_threshold=None,
    rank_bits=32,
    ranked_keys=0,
    score_variance=0.0,
    scale=None,
) -> Plan:
    """A plan with the tests' defaults: exact attention over a fully ranked history."""
    return Plan(
        layout=layout,
        order_per_kv_head=order_per_kv_head,
        group_units=group_units,
        block_m=block_m,
        block_n=block_n,
        threshold=threshold,
        patience=patience,
        tail_threshold=tail_threshold,
        rank_bits=rank_bits,
        ranked_keys=ranked_keys,
        score_variance=score_variance,
        scale=scale,
    )


def case_plan(case: Case, **knobs) -> Plan:
    """The plan of a case (its layout and tile sizes) with ``make_plan``'s knobs."""
    return make_plan(case_layout(case), block_m=case.block_m, block_n=case.block_n, **knobs)


def run_pipeline(case: Case, q, k, v, **knobs):
    """The three ops in sequence with ``case_plan(case, **knobs)``; returns (scores, indices,
    (out, lse, tile_counts))."""
    return case_plan(case, **knobs).run(q, k, v)


def tiny_model_config(kind: str = "llama", *, hidden_size: int = 128, **overrides):
    """The transformers config of a small Llama-architecture model to initialise randomly
    (``kind``: "llama" or "qwen2"): GQA with 4 query heads and 2 KV heads of dimension
    hidden_size / 4, an MLP twice as wide as the hidden size, then ``overrides``."""
    import transformers

    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[kind]
    return config_class(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        **overrides,
    )


def assert_reproduces_layer_output(model, layer: int, captured, output, *, rtol: float):
    """Captured post-RoPE Q/K/V of a Llama attention layer (s2o.capture), through causal SDPA and
    the layer's o_proj, give the output of its attention module, ``output`` [B, N, hidden]."""
    attention = F.scaled_dot_product_attention(
        captured.query,
        captured.key,
        captured.value,
        is_causal=True,
        enable_gqa=True,
        scale=captured.scale,
    )  # [B, Hq, N, D]
    batch, heads, length, head_dim = attention.shape
    projected = model.model.layers[layer].self_attn.o_proj(
        attention.transpose(1, 2).reshape(batch, length, heads * head_dim)
    )
    torch.testing.assert_close(projected, output, atol=1e-5, rtol=rtol)
