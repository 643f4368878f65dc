"""s2o.varlen_attention: packed sequences equal each sequence run alone (s2o.attention at the
default, dense attention at threshold 0), paged K/V equal contiguous, and every bad argument
raises naming it."""

from __future__ import annotations

import pytest
import torch

import s2o
from s2o import reference
from s2o.data import structured_qkv

from .conftest import TOLERANCES

DEFAULT = s2o.S2OConfig(min_keys=0, segment_size=64, causal_alignment="bottom_right")
EXACT = s2o.S2OConfig(min_keys=0, segment_size=64, threshold=0.0)


def _packed(lengths_q, lengths_k, q_heads=4, kv_heads=2, dtype=torch.float32, head_dim=64):
    """Structured sequences (so that rankings and stops matter) packed flash-attn style: q, k, v,
    cu_seqlens_q, cu_seqlens_k, and each sequence's [1, H, n, D] tensors."""
    sequences = []
    for b, (n_q, n_k) in enumerate(zip(lengths_q, lengths_k, strict=True)):
        q, k, v = structured_qkv(max(n_k, n_q, 1), q_heads=q_heads, kv_heads=kv_heads,
                                 head_dim=head_dim, dtype=dtype, seed=b,
                                 topic_span=256)  # fmt: skip
        sequences.append((q[:, :, q.shape[2] - n_q :], k[:, :, :n_k], v[:, :, :n_k]))

    def pack(i):
        return torch.cat([s[i][0].transpose(0, 1) for s in sequences])

    def offsets(lengths):
        return torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)

    return pack(0), pack(1), pack(2), offsets(lengths_q), offsets(lengths_k), sequences


def _paged(k, lengths_k, page_size, generator):
    """k [total_k, H, D] as shuffled pages: ([num_pages, page_size, H, D], block_table)."""
    pages_per_sequence = [-(-n // page_size) for n in lengths_k]
    num_pages = sum(pages_per_sequence) + 3  # a few pages no sequence uses
    order = torch.randperm(num_pages, generator=generator)
    cache = torch.randn(num_pages, page_size, *k.shape[1:], generator=generator).to(k.dtype)
    table = torch.full((len(lengths_k), max(pages_per_sequence) + 1), -7, dtype=torch.int32)
    start, used = 0, 0
    for b, (n, pages) in enumerate(zip(lengths_k, pages_per_sequence, strict=True)):
        for p in range(pages):
            page = int(order[used])
            rows = k[start + p * page_size : start + min((p + 1) * page_size, n)]
            cache[page, : rows.shape[0]] = rows
            table[b, p] = page
            used += 1
        start += n
    return cache, table


# Lengths (queries, keys): 1 query, shorter than a tile, not multiples of the tile or segment,
# chunked prefill (fewer queries than keys), a sequence with no queries.
LENGTHS_Q = [1, 37, 300, 0, 129, 700]
LENGTHS_K = [90, 37, 300, 50, 400, 700]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (2, 1)], ids=["mha", "gqa", "mqa"])
def test_varlen_equals_each_sequence_alone_at_the_default(dtype, heads):
    q, k, v, cu_q, cu_k, sequences = _packed(LENGTHS_Q, LENGTHS_K, *heads, dtype=dtype)
    out, lse, stats = s2o.varlen_attention(
        q, k, v, cu_q, cu_k, max(LENGTHS_Q), max(LENGTHS_K), config=DEFAULT, return_lse=True,
        return_stats=True,
    )  # fmt: skip
    assert out.shape == q.shape and lse.shape == (q.shape[1], q.shape[0])
    atol, rtol = TOLERANCES[dtype]
    for b, (sq, sk, sv) in enumerate(sequences):
        rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
        if sq.shape[2] == 0:
            continue
        alone, alone_stats = s2o.attention(sq, sk, sv, is_causal=True, enable_gqa=True,
                                           config=DEFAULT, return_stats=True)  # fmt: skip
        torch.testing.assert_close(out[rows], alone[0].transpose(0, 1), atol=atol, rtol=rtol)
        assert stats[b].path == alone_stats.path
        if alone_stats.path == "sparse":
            assert torch.equal(stats[b].tile_counts, alone_stats.tile_counts)
    assert [s.path for s in stats] == ["dense", "sparse", "sparse", "dense", "sparse", "sparse"]


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_at_threshold_0_is_dense_attention_per_sequence(causal):
    lengths_k = LENGTHS_K
    lengths_q = LENGTHS_Q if causal else [40, 200, 1, 0, 65, 90]
    q, k, v, cu_q, cu_k, sequences = _packed(lengths_q, lengths_k)
    out, lse = s2o.varlen_attention(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k),
                                    causal=causal, softmax_scale=0.3, config=EXACT,
                                    return_lse=True)  # fmt: skip
    for b, (sq, sk, sv) in enumerate(sequences):
        rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
        expected, expected_lse = reference.dense_attention(
            sq, sk, sv, is_causal=causal, q_offset=sk.shape[2] - sq.shape[2], scale=0.3
        )
        torch.testing.assert_close(out[rows], expected[0].transpose(0, 1), atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse[:, rows], expected_lse[0], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("page_size", [16, 64, 256])
def test_paged_kv_equals_contiguous(page_size):
    generator = torch.Generator().manual_seed(page_size)
    q, k, v, cu_q, cu_k, _ = _packed(LENGTHS_Q, LENGTHS_K)
    k_cache, table = _paged(k, LENGTHS_K, page_size, generator)
    v_cache, _ = _paged(v, LENGTHS_K, page_size, torch.Generator().manual_seed(page_size))
    args = (cu_q, cu_k, max(LENGTHS_Q), max(LENGTHS_K))
    contiguous = s2o.varlen_attention(q, k, v, *args, config=DEFAULT)
    paged = s2o.varlen_attention(q, k_cache, v_cache, *args, block_table=table, config=DEFAULT)
    assert torch.equal(paged, contiguous)


def _good():
    q, k, v, cu_q, cu_k, _ = _packed([20, 30], [40, 30])
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=30,
                max_seqlen_k=40)  # fmt: skip


def _call(**changes):
    args = {**_good(), **changes}
    keywords = {name: args.pop(name) for name in ("block_table", "causal") if name in args}
    return s2o.varlen_attention(*args.values(), **keywords)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(q=torch.randn(1, 50, 4, 64)), r"q must be \[total_q, Hq, D\]"),
        (dict(k=torch.randn(70, 2, 32)), "same shape"),
        (dict(v=torch.randn(70, 2, 64).double()), "one dtype"),
        (dict(q=torch.randn(50, 3, 64)), "multiple of k's"),
        (dict(cu_seqlens_q=torch.tensor([0, 20, 50])), "cu_seqlens_q must be int32"),
        (dict(cu_seqlens_q=torch.tensor([1, 20, 50], dtype=torch.int32)), "start at 0"),
        (dict(cu_seqlens_k=torch.tensor([0, 50, 40, 70], dtype=torch.int32)), "non-decreasing"),
        (dict(cu_seqlens_k=torch.tensor([0, 40, 60], dtype=torch.int32)), "end at the packed"),
        (dict(cu_seqlens_k=torch.tensor([0, 70], dtype=torch.int32)), "same batch"),
        (dict(max_seqlen_k=39), "max_seqlen_k must be an int >="),
        (dict(max_seqlen_q=30.0), "max_seqlen_q must be an int"),
        (dict(cu_seqlens_q=torch.tensor([0, 45, 50], dtype=torch.int32), max_seqlen_q=45),
         "sequence 0 has 45 queries"),
        (dict(block_table=torch.zeros(2, 4, dtype=torch.int32)), "num_pages, page_size"),
    ],
)  # fmt: skip
def test_bad_arguments_raise_naming_them(changes, message):
    with pytest.raises((ValueError, TypeError), match=message):
        _call(**changes)


@pytest.mark.parametrize(
    "page_size, table, message",
    [
        (16, torch.zeros(2, 4), "block_table must be int32"),
        (16, torch.zeros(3, 4, dtype=torch.int32), "one row per sequence"),
        (24, torch.zeros(2, 4, dtype=torch.int32), "multiple of 16"),
        (16, torch.zeros(2, 2, dtype=torch.int32), "sequence 0 needs 3"),
        (16, torch.full((2, 4), 9, dtype=torch.int32), "out of range"),
    ],
)
def test_bad_page_tables_raise_naming_them(page_size, table, message):
    cache = torch.randn(6, page_size, 2, 64)
    with pytest.raises(ValueError, match=message):
        _call(k=cache, v=cache, block_table=table)


def test_varlen_strict_mode_raises_on_a_dense_fallback():
    with pytest.raises(s2o.S2OFallbackError, match="short"):
        args = _good()
        s2o.varlen_attention(*args.values(), config=s2o.S2OConfig(strict=True))
