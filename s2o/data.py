"""Synthetic long-context Q/K/V with the attention structures of trained LLMs.

``structured_qkv`` builds pre-RoPE queries and keys from a few components, applies rotary position
embedding (Llama-3 style, rotate-half, base 500000) and returns post-RoPE Q, K and random V. In
logit units (after the softmax scale 1/sqrt(D)) the components are:

- **sinks**: the first ``num_sinks`` keys carry a strong "sink" direction that every query shares;
- **local window**: query and key share one vector spread over the high- and mid-frequency rotary
  pairs, so after RoPE their product decays with distance: a window of a few hundred keys;
- **slash lines**: the query carries a copy of a high-frequency key vector rotated back by an
  offset, so it peaks at a fixed relative distance (``i - j = offset``);
- **vertical stripes**: about 1% of keys carry one of several "topic" directions; queries carry
  the direction of the topic of their region of the text (topics change every ``topic_span``
  positions), so different parts of the sequence retrieve different stripes;
- **noise**: Gaussian components in every dimension: the diffuse background.

Sinks, topics and stripes live in the lowest-frequency rotary pairs, which barely rotate over
128K positions. Each query head draws a type with its own amplitudes: ``streaming`` (sinks and
local window), ``retrieval`` (stripes), ``slash``, or ``diffuse`` (noise-dominated); the G query
heads of a KV group share that group's keys. Everything is drawn from ``seed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

HEAD_TYPES = ("streaming", "retrieval", "slash", "diffuse")
# Share of query heads of each type (in HEAD_TYPES order).
HEAD_TYPE_SHARES = (0.35, 0.30, 0.15, 0.20)


@dataclass(frozen=True)
class HeadProfile:
    kind: str
    sink: float  # logit of the sink keys
    local: float  # logit of the local window at distance 0
    stripe: float  # logit of a full-strength stripe of the query's topic
    slash: float  # logit of the slash line at its offset
    slash_offset: int
    noise: float  # standard deviation of the background logits


def head_profiles(num_heads: int, seed: int = 0) -> list[HeadProfile]:
    """One profile per query head, drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed * 7919 + 17)

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    cumulative = torch.tensor(HEAD_TYPE_SHARES).cumsum(0)
    profiles = []
    for _ in range(num_heads):
        kind = HEAD_TYPES[
            int(torch.searchsorted(cumulative, torch.rand((), generator=g)).clamp(max=3))
        ]
        if kind == "streaming":
            p = HeadProfile(
                kind, uniform(10, 14), uniform(8, 11), uniform(0, 3), 0.0, 0, uniform(0.5, 1.0)
            )
        elif kind == "retrieval":
            p = HeadProfile(
                kind, uniform(6, 9), uniform(4, 6), uniform(9, 12), 0.0, 0, uniform(0.5, 1.0)
            )
        elif kind == "slash":
            offset = int(2 ** uniform(4, 11))
            p = HeadProfile(
                kind,
                uniform(7, 9),
                uniform(3, 5),
                uniform(0, 3),
                uniform(9, 12),
                offset,
                uniform(0.5, 1.0),
            )
        else:
            p = HeadProfile(
                kind, uniform(3, 5), uniform(2, 4), uniform(1, 3), 0.0, 0, uniform(1.2, 1.6)
            )
        profiles.append(p)
    return profiles


def rope(x: torch.Tensor, base: float = 500000.0) -> torch.Tensor:
    """Rotary embedding (rotate-half convention) of x [..., N, D] at positions 0..N-1."""
    n, d = x.shape[-2], x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d // 2, device=x.device, dtype=torch.float32) * 2 / d)
    angles = torch.arange(n, device=x.device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _rotate(x: torch.Tensor, offset: int, base: float) -> torch.Tensor:
    """x [..., D] rotated by RoPE at position `offset` (may be negative)."""
    d = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d // 2, device=x.device, dtype=torch.float32) * 2 / d)
    angles = offset * inv_freq
    cos, sin = angles.cos().repeat(2), angles.sin().repeat(2)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _pair_vector(d: int, pairs: range, g: torch.Generator, device) -> torch.Tensor:
    """A random vector over the given rotary pairs (dims f and f + D/2), with |v|^2 = sqrt(D) so
    that a product of two such unit components is one logit after the 1/sqrt(D) scale."""
    v = torch.zeros(d)
    for f in pairs:
        angle = 2 * math.pi * float(torch.rand((), generator=g))
        v[f], v[f + d // 2] = math.cos(angle), math.sin(angle)
    return (v * d**0.25 / v.norm()).to(device)


def structured_qkv(
    seq_len: int,
    *,
    batch: int = 1,
    q_heads: int = 32,
    kv_heads: int = 8,
    head_dim: int = 128,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int = 0,
    num_sinks: int = 4,
    num_topics: int = 8,
    stripe_density: float = 0.01,
    topic_span: int = 2048,
    rope_base: float = 500000.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Post-RoPE ``q [B, Hq, N, D]``, ``k, v [B, Hkv, N, D]`` with sinks, a local window, slash
    lines, query-dependent vertical stripes and noise (see the module docstring)."""
    if q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    if head_dim % 16:
        raise ValueError(f"head_dim must be a multiple of 16, got {head_dim}")
    g = torch.Generator().manual_seed(seed)
    pairs = head_dim // 2
    high = range(0, pairs // 4)  # fastest rotating pairs: sharp slash lines
    local = range(0, pairs // 2)  # high + mid frequencies: a window of a few hundred keys
    content = range(pairs - pairs // 8, pairs)  # slowest pairs: stable over 128K positions
    group = q_heads // kv_heads
    profiles = head_profiles(q_heads, seed)
    n = seq_len
    dev_gen = torch.Generator(device=device).manual_seed(seed + 1)

    def randn(*shape):
        return torch.randn(*shape, generator=dev_gen, device=device)

    positions = torch.arange(n, device=device)
    # Query topic by region of the text; key topics and stripe strengths at random.
    region_topic = torch.randint(0, num_topics, (n // topic_span + 1,), generator=g).to(device)
    query_topic = region_topic[positions // topic_span]

    q = torch.empty(batch, q_heads, n, head_dim, device=device)
    k = torch.empty(batch, kv_heads, n, head_dim, device=device)
    for b in range(batch):
        for hk in range(kv_heads):
            u_local = _pair_vector(head_dim, local, g, device)
            u_slash = _pair_vector(head_dim, high, g, device)
            e_sink = _pair_vector(head_dim, content, g, device)
            topics = torch.stack(
                [_pair_vector(head_dim, content, g, device) for _ in range(num_topics)]
            )
            stripe = torch.rand(n, generator=dev_gen, device=device) < stripe_density
            strength = torch.where(
                stripe, 0.5 + 0.5 * torch.rand(n, generator=dev_gen, device=device), 0.0
            )
            key_topic = torch.randint(0, num_topics, (n,), generator=dev_gen, device=device)
            kk = randn(n, head_dim) + u_local + u_slash + strength[:, None] * topics[key_topic]
            kk[:num_sinks] += e_sink
            k[b, hk] = kk
            for gi in range(group):
                h = hk * group + gi
                p = profiles[h]
                qq = randn(n, head_dim) * p.noise
                qq += p.local * u_local + p.sink * e_sink + p.stripe * topics[query_topic]
                if p.slash:
                    qq += p.slash * _rotate(u_slash, -p.slash_offset, rope_base)
                q[b, h] = qq
    # Keys carry unit noise, so the background logits have std = the head's noise factor.
    q = rope(q, rope_base)
    k = rope(k, rope_base)
    v = torch.randn(batch, kv_heads, n, head_dim, generator=dev_gen, device=device)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def attention_mass_stats(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    num_rows: int = 64,
    fractions: tuple[float, ...] = (0.01, 0.03, 0.10),
) -> torch.Tensor:
    """Share of softmax mass in the top fraction of keys, per query head, averaged over the last
    ``num_rows`` query rows (causal, Nq == Nk). Returns fp32 ``[Hq, len(fractions)]`` (batch 0)."""
    n, d = query.shape[2], query.shape[3]
    group = query.shape[1] // key.shape[1]
    rows = query[0, :, n - num_rows :].float()
    keys = key[0].float().repeat_interleave(group, dim=0)
    logits = rows @ keys.transpose(-1, -2) / math.sqrt(d)
    pos = torch.arange(n - num_rows, n, device=query.device)[:, None]
    logits = logits.masked_fill(torch.arange(n, device=query.device)[None, :] > pos, float("-inf"))
    probs = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True).values.cumsum(-1)
    cols = [max(1, int(round(f * n))) - 1 for f in fractions]
    return probs[..., cols].mean(dim=1)
