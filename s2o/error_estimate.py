"""The error estimate of every s2o.attention call: a few query rows per head computed exactly.

``sample_rows`` picks ``count`` query rows, half spread evenly over the sequence, half where the
output's norm is (``row_weights`` of the first sparse output of the call: deterministic, the
same rows for every head of the call), each with the number of rows it stands for.
``exact_rows`` computes those rows exactly with dense SDPA, once per call for all heads (the G
query heads of a KV group as G x count rows against their own K/V, nothing repeated; the causal
mask of each row's position); ``sampled_squared_error`` compares the sparse output with them,
per head: the squared error and squared norm of the sampled rows, each times the rows it stands
for, estimate the head's sums over all rows, and ``relative_error`` of the two is the estimate.
Everything stays on the device (no host sync; CUDA graphs capture it). Its cost is ``count``
query rows per head of dense attention: at 128K and 64 rows about 1/2000 of the dense call's
work. On CUDA long histories are split into key chunks computed side by side and merged by their
log-sum-exp (_KEY_CHUNK).

What it estimates: the relative L2 error over all rows of the head, from a sample. Errors of
trained heads concentrate in few rows, so a small sample can miss them (the estimate then reads
low); both outputs are rounded to the input dtype, so the estimate has a floor of that rounding
(about 0.3% in bf16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Dense attention before s2o.attention may replace F.scaled_dot_product_attention (patch_sdpa).
_sdpa = F.scaled_dot_product_attention


def squared_row_norms(out: torch.Tensor) -> torch.Tensor:
    """fp32 [B * H, Nq]: the squared norm of every output row of ``out`` [B, H, Nq, D]."""
    # (vector_norm reduces in fp32 without an fp32 copy of the output: 7x faster at 32K on the CPU)
    return torch.linalg.vector_norm(out, dim=-1, dtype=torch.float32).square().flatten(0, -2)


def row_weights(norms: torch.Tensor) -> torch.Tensor:
    """fp32 [Nq]: each query row's share of the squared output norm (``norms`` [B * H, Nq], from
    :func:`squared_row_norms`), averaged over batch and heads (each head's shares sum to 1):
    where a head's relative L2 error gets its weight."""
    totals = norms.sum(dim=-1, keepdim=True)
    return torch.where(totals > 0, norms / totals, 1.0 / norms.shape[-1]).mean(dim=0)


def sample_rows(weights: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` query rows (int64 [R], rising, R = min(count, Nq), repeats allowed) drawn
    systematically from p = (1/Nq + weights / sum(weights)) / 2, and each row's expansion factor
    1 / (R p) (fp32 [R]: the rows it stands for). Half the sample is spread evenly (one row per
    stratum of Nq / R rows when ``weights`` is flat), half follows ``weights``: with the rows'
    output norms as weights the estimate of a relative L2 error is not swamped by the few early
    rows that hold most of the norm (on random data at 128K an even sample read 4.5% where all
    rows give 39%)."""
    num_queries = weights.shape[0]
    count = min(count, num_queries)
    weights = weights.double()
    total = weights.sum()
    share = torch.where(total > 0, weights / total, 1.0 / num_queries)
    density = 0.5 / num_queries + 0.5 * share
    cumulative = density.cumsum(0)
    points = (torch.arange(count, device=weights.device, dtype=torch.float64) + 0.5) / count
    rows = torch.searchsorted(cumulative, points, right=True).clamp_(max=num_queries - 1)
    return rows, (1.0 / (count * density[rows])).float()


def exact_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rows: torch.Tensor,
    *,
    q_offset: int,
    is_causal: bool,
    scale: float | None,
) -> torch.Tensor:
    """Dense attention of query rows ``rows`` [R]: [B, Hq, R, D] (fp32 on CUDA past
    _KEY_CHUNK keys, else query's dtype)."""
    batch, q_heads, _, head_dim = query.shape
    kv_heads, num_keys = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    count = rows.shape[0]
    sampled = query.index_select(2, rows).reshape(batch, kv_heads, group * count, head_dim)
    positions = (rows + q_offset).repeat(group) if is_causal else None  # [G * R]
    if query.device.type == "cuda" and num_keys > _KEY_CHUNK:
        exact = _chunked_exact_rows(sampled, key, value, positions, scale)
    else:
        mask = None
        if is_causal:
            mask = torch.arange(num_keys, device=query.device)[None, :] <= positions[:, None]
        exact = _sdpa(sampled, key, value, attn_mask=mask, scale=scale)
    return exact.reshape(batch, q_heads, count, head_dim)


# Keys per chunk of the exact rows on CUDA. A few hundred sampled rows against a long history
# give the attention kernel too few thread blocks (one per 64 rows and head); chunks of the keys
# side by side, merged by their log-sum-exp, fill the GPU.
_KEY_CHUNK = 8192


def _chunked_exact_rows(sampled, key, value, positions, scale) -> torch.Tensor:
    """sampled [B, Hkv, M, D] against key/value [B, Hkv, N, D] in chunks of _KEY_CHUNK keys (the
    whole chunks in one call, the rest in a second), rows masked past ``positions`` [M] (None:
    no mask); merged in fp32: [B, Hkv, M, D]."""
    num_keys = key.shape[2]
    whole = num_keys // _KEY_CHUNK
    parts = [_attend_chunks(sampled, key, value, 0, whole, _KEY_CHUNK, positions, scale)]
    if num_keys > whole * _KEY_CHUNK:
        tail = num_keys - whole * _KEY_CHUNK
        parts.append(
            _attend_chunks(sampled, key, value, whole * _KEY_CHUNK, 1, tail, positions, scale)
        )
    out = torch.cat([p[0] for p in parts], dim=1)  # [B, C, Hkv, M, D]
    lse = torch.cat([p[1] for p in parts], dim=1)  # [B, C, Hkv, M]
    weights = torch.softmax(lse, dim=1)  # a row sees key 0, so chunk 0's lse is finite
    return (weights.unsqueeze(-1) * out.nan_to_num()).sum(dim=1)


def _attend_chunks(sampled, key, value, begin, chunks, size, positions, scale):
    """Keys [begin, begin + chunks * size) as ``chunks`` chunks of ``size``: per chunk the
    attention output (fp32) and log-sum-exp of every sampled row, [B, C, Hkv, M, D] and
    [B, C, Hkv, M]."""
    batch, kv_heads, rows, head_dim = sampled.shape
    span = slice(begin, begin + chunks * size)

    def by_chunk(t):  # [B, Hkv, C * size, D] -> [B * C, Hkv, size, D]
        t = t[:, :, span].unflatten(2, (chunks, size)).transpose(1, 2)
        return t.reshape(batch * chunks, kv_heads, size, head_dim)

    q = sampled.unsqueeze(1).expand(batch, chunks, kv_heads, rows, head_dim)
    q = q.reshape(batch * chunks, kv_heads, rows, head_dim)
    bias = None
    if positions is not None:
        # Additive mask [C, M, size], its rows padded to 16 elements (the kernel's alignment).
        padded = -(-size // 16) * 16
        first = begin + size * torch.arange(chunks, device=q.device).view(chunks, 1, 1)
        keys = first + torch.arange(padded, device=q.device)  # [C, 1, padded]: key positions
        bias = torch.zeros(chunks, rows, padded, device=q.device, dtype=q.dtype)
        bias.masked_fill_(keys > positions[None, :, None], float("-inf"))
        bias = bias.repeat(batch, 1, 1)[:, None, :, :size].expand(-1, kv_heads, -1, -1)
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, by_chunk(key), by_chunk(value), bias, True, scale=scale
    )[:2]
    out = out.float().view(batch, chunks, kv_heads, rows, head_dim)
    lse = lse[..., :rows].reshape(batch, chunks, kv_heads, rows)  # the kernel pads its rows
    if positions is not None:
        # A row that sees no key of a chunk gets lse +inf from the kernel: make it -inf (weight 0).
        first = begin + size * torch.arange(chunks, device=q.device)
        unseen = first[:, None] > positions[None, :]  # [C, M]
        lse = lse.masked_fill(unseen[None, :, None, :], float("-inf"))
    return out, lse


def sampled_squared_error(
    out: torch.Tensor, exact: torch.Tensor, rows: torch.Tensor, factors: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(squared error, squared reference), fp32 [B, H] each, estimates of the sums over all rows:
    of ``out`` [B, H, Nq, D] on the sampled ``rows`` against their exact attention ``exact``
    [B, H, R, D] (:func:`exact_rows`), each row times its expansion factor (:func:`sample_rows`).
    Their ratio's square root is the head's relative L2 error estimate (:func:`relative_error`)."""
    exact = exact.float()
    diff = out.index_select(2, rows).float() - exact
    factors = factors[:, None]
    return (diff.square() * factors).sum(dim=(2, 3)), (exact.square() * factors).sum(dim=(2, 3))


def relative_error(squared: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """sqrt(squared / reference), elementwise (the absolute error where the reference is 0)."""
    return torch.where(reference > 0, squared / reference, squared).sqrt()
