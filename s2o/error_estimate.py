"""The error estimate of every s2o.attention call: a few query rows per head computed exactly.

``sample_rows`` picks ``count`` query rows spread over the whole sequence (one per stratum of
equal size, at a low-discrepancy offset inside it: deterministic, the same for every head and
call of that shape). ``sampled_squared_error`` computes those rows exactly with dense SDPA (the G
query heads of a KV group as G x count rows against their own K/V, nothing repeated; the causal
mask of each row's position) and returns, per head, the relative L2 error of the sparse output on
them: ``||out_s - exact_s|| / ||exact_s||`` over the sampled rows. Everything stays on the device
(no host sync; CUDA graphs capture it). Its cost is ``count`` query rows per head of dense
attention: at 128K and 64 rows about 1/2000 of the dense call.

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
_GOLDEN = 0.6180339887498949


def sample_rows(num_queries: int, count: int, device: torch.device) -> torch.Tensor:
    """int64 [n] row indices, n = min(count, num_queries): stratum i is the rows
    [i N / n, (i + 1) N / n) (integer division), and its row sits at the share frac(i x golden
    ratio) of it."""
    count = min(count, num_queries)
    bounds = torch.arange(count + 1, device=device) * num_queries // count
    offsets = torch.frac(torch.arange(count, device=device, dtype=torch.float64) * _GOLDEN)
    return bounds[:-1] + (offsets * (bounds[1:] - bounds[:-1])).long()


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
    """Dense attention of query rows ``rows`` [R]: [B, Hq, R, D] in query's dtype."""
    batch, q_heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    count = rows.shape[0]
    sampled = query.index_select(2, rows).reshape(batch, kv_heads, group * count, head_dim)
    mask = None
    if is_causal:
        positions = rows + q_offset
        keys = torch.arange(key.shape[2], device=query.device)
        mask = (keys[None, :] <= positions[:, None]).repeat(group, 1)  # [G * R, Nk]
    exact = _sdpa(sampled, key, value, attn_mask=mask, scale=scale)
    return exact.reshape(batch, q_heads, count, head_dim)


def sampled_squared_error(
    out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rows: torch.Tensor,
    *,
    q_offset: int,
    is_causal: bool,
    scale: float | None,
) -> torch.Tensor:
    """(squared error, squared reference), fp32 [B, Hq] each: of ``out`` [B, Hq, Nq, D] on the
    sampled ``rows`` against their exact attention. Their ratio's square root is the head's
    relative L2 error estimate (:func:`relative_error`)."""
    exact = exact_rows(
        query, key, value, rows, q_offset=q_offset, is_causal=is_causal, scale=scale
    ).float()
    diff = out.index_select(2, rows).float() - exact
    return diff.square().sum(dim=(2, 3)), exact.square().sum(dim=(2, 3))


def relative_error(squared: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """sqrt(squared / reference), elementwise (the absolute error where the reference is 0)."""
    return torch.where(reference > 0, squared / reference, squared).sqrt()
