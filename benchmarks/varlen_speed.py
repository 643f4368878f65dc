"""Serving shapes: a packed batch of sequences of different lengths through
s2o.varlen_attention, against dense attention run sequence by sequence and FlexAttention with a
document mask, and the same batch with K/V in a paged cache.

Hq=32, Hkv=8, D=128, bf16, causal; each sequence is its own draw of the package's structured data
(s2o.data, seed = its index). Rows: SDPA's cuDNN and flash backends called once per sequence
(``cudnn``, ``flash``), FlexAttention over the whole packed batch with a causal document mask
built from block indices (``flex``; needs lengths that are multiples of 128), s2o.varlen_attention
on the packed K/V (``s2o``) and on a paged copy of them (``s2o-paged``: pages of ``--page-size``
rows in a shuffled order, read through ``block_table``). s2o runs the package's default config
(short sequences go to dense SDPA by ``min_keys``, as in a user's call; ``--config`` overrides).
Columns: median ms (CUDA events after warm-up; wall clock on the CPU), dense-equivalent TFLOP/s
(the causal FLOPs of every sequence), the ratio to ``cudnn`` (``sdpa`` on the CPU), error against
fp32 attention of each sequence over all rows (relative L2 of the whole batch, the worst head of
any sequence, the worst sequence), and for s2o how many sequences took the sparse path and its
density over them.

    python -m benchmarks.varlen_speed                               # 128K + 64K + 32K + 8K + 8 x 2K
    python -m benchmarks.varlen_speed --lengths 32768 4096 4096 --page-size 16
    python -m benchmarks.varlen_speed --device cpu --lengths 1024 300 300 --config min_keys=0
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import s2o
from benchmarks.attention_speed import EXACT_TOLERANCE, HEAD_DIM, KV_HEADS, Q_HEADS
from benchmarks.common import (
    dense_reference,
    markdown_table,
    median_ms,
    parse_config_overrides,
    print_run_header,
    write_csv,
    write_json,
)
from s2o import data

DEFAULT_LENGTHS = [131072, 65536, 32768, 8192] + [2048] * 8
FLEX_BLOCK = 128
GPU_METHODS = ("cudnn", "flash", "flex", "s2o", "s2o-paged")
CPU_METHODS = ("sdpa", "s2o", "s2o-paged")


def causal_flops(lengths: list[int], q_heads: int, head_dim: int) -> float:
    """FLOPs of dense causal attention of every sequence (QK^T and PV, 2 per multiply-add)."""
    return sum(4.0 * q_heads * head_dim * n * (n + 1) / 2 for n in lengths)


def packed_batch(lengths, *, q_heads, kv_heads, head_dim, device, dtype=torch.bfloat16):
    """q ``[total, Hq, D]``, k, v ``[total, Hkv, D]`` and cu_seqlens int32 ``[B+1]``: one draw of
    the structured data per sequence, packed."""
    parts = [
        data.structured_qkv(
            n, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, device=device,
            seed=i,
        )
        for i, n in enumerate(lengths)
    ]  # fmt: skip
    q, k, v = (torch.cat([p[t][0].transpose(0, 1) for p in parts]) for t in range(3))
    ends = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int64), ends]).to(torch.int32).to(device)
    return q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens


def sequences(t: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    """Each sequence of a packed ``[total, H, D]`` tensor as a ``[1, H, n, D]`` view."""
    return [part.transpose(0, 1)[None] for part in torch.split(t, lengths)]


def paged_cache(k, v, lengths, page_size: int, seed: int = 0):
    """k, v as ``[num_pages, page_size, Hkv, D]`` pages in a shuffled order (each sequence's last
    page zero-padded) and the int32 ``[B, max_pages]`` block_table that finds them."""
    pages_per_seq = [-(-n // page_size) for n in lengths]
    total_pages = sum(pages_per_seq)
    order = torch.randperm(total_pages, generator=torch.Generator().manual_seed(seed))
    block_table = torch.zeros(len(lengths), max(pages_per_seq), dtype=torch.int32)
    paged = []
    for t in (k, v):
        pages = t.new_zeros(total_pages, page_size, *t.shape[1:])
        first_page = 0
        for b, (part, count) in enumerate(zip(torch.split(t, lengths), pages_per_seq, strict=True)):
            padded = F.pad(part, (0, 0, 0, 0, 0, count * page_size - part.shape[0]))
            slots = order[first_page : first_page + count]
            pages[slots.to(t.device)] = padded.view(count, page_size, *t.shape[1:])
            block_table[b, :count] = slots.to(torch.int32)
            first_page += count
        paged.append(pages)
    return paged[0], paged[1], block_table.to(k.device)


def dense_per_sequence(backend: SDPBackend | None, lengths: list[int]):
    """SDPA called once per sequence (``backend`` None: PyTorch's choice)."""

    def run(q, k, v):
        outs = []
        for sq, sk, sv in zip(*(sequences(t, lengths) for t in (q, k, v)), strict=True):
            with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                out = F.scaled_dot_product_attention(sq, sk, sv, is_causal=True, enable_gqa=True)
            outs.append(out[0].transpose(0, 1))
        return torch.cat(outs)

    return run


def flex_document(lengths: list[int], device):
    """FlexAttention over the packed batch with a causal document mask, its BlockMask built from
    block indices (no total x total mask): query block i of a document attends fully to the
    document's blocks before it and partially (the mask_mod decides) to itself."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if any(n % FLEX_BLOCK for n in lengths):
        raise ValueError(f"flex needs lengths that are multiples of {FLEX_BLOCK}, got {lengths}")
    total = sum(lengths)
    blocks = total // FLEX_BLOCK
    document = torch.repeat_interleave(
        torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device)
    )
    block_start = torch.repeat_interleave(
        torch.tensor([0] + lengths[:-1], device=device).cumsum(0) // FLEX_BLOCK,
        torch.tensor(lengths, device=device) // FLEX_BLOCK,
    )  # the first block of each query block's document
    ar = torch.arange(blocks, device=device, dtype=torch.int32)
    full_num = (ar - block_start.to(torch.int32)).view(1, 1, blocks)
    full_idx = block_start.view(-1, 1) + torch.arange(blocks, device=device).view(1, -1)
    full_idx = full_idx.clamp(max=blocks - 1).to(torch.int32).view(1, 1, blocks, blocks)
    partial_num = torch.ones(1, 1, blocks, device=device, dtype=torch.int32)
    partial_idx = ar.view(1, 1, blocks, 1).expand(1, 1, blocks, blocks).contiguous()

    def document_causal(b, h, q_idx, kv_idx):
        return (document[q_idx] == document[kv_idx]) & (q_idx >= kv_idx)

    mask = BlockMask.from_kv_blocks(
        partial_num, partial_idx, full_num, full_idx.contiguous(), BLOCK_SIZE=FLEX_BLOCK,
        mask_mod=document_causal, seq_lengths=(total, total),
    )  # fmt: skip
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v):
        out = compiled(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=mask,
                       enable_gqa=True)  # fmt: skip
        return out[0].transpose(0, 1)

    return run


def s2o_varlen(lengths, config, cu_seqlens, block_table=None, pages=None):
    """s2o.varlen_attention on the packed batch (with ``pages``: K/V from the paged cache)."""
    longest = max(lengths)

    def run(q, k, v, return_stats=False):
        if pages is not None:
            k, v = pages
        return s2o.varlen_attention(
            q, k, v, cu_seqlens, cu_seqlens, longest, longest, causal=True,
            block_table=block_table, config=config, return_stats=return_stats,
        )  # fmt: skip

    return run


def errors(out, references, lengths) -> dict:
    """Relative L2 error against fp32 over all rows of the batch, of the worst head of any
    sequence and of the worst sequence."""
    squared, norms, worst_head, worst_seq = 0.0, 0.0, 0.0, 0.0
    for part, ref in zip(sequences(out, lengths), references, strict=True):
        diff = (part.float() - ref).square().sum(dim=(0, 2, 3))
        norm = ref.square().sum(dim=(0, 2, 3))
        squared, norms = squared + float(diff.sum()), norms + float(norm.sum())
        worst_head = max(worst_head, float((diff / norm).sqrt().max()))
        worst_seq = max(worst_seq, float((diff.sum() / norm.sum()).sqrt()))
    return dict(rel_err=(squared / norms) ** 0.5, worst_head=worst_head, worst_seq=worst_seq)


def run(args) -> list[dict]:
    device = torch.device(args.device)
    lengths = args.lengths
    config = s2o.S2OConfig(**parse_config_overrides(args.config))
    q, k, v, cu_seqlens = packed_batch(
        lengths, q_heads=args.q_heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
        device=device,
    )  # fmt: skip
    references = [
        dense_reference(sq, sk, sv)
        for sq, sk, sv in zip(*(sequences(t, lengths) for t in (q, k, v)), strict=True)
    ]
    k_pages, v_pages, block_table = paged_cache(k, v, lengths, args.page_size)
    methods = {
        "cudnn": lambda: dense_per_sequence(SDPBackend.CUDNN_ATTENTION, lengths),
        "flash": lambda: dense_per_sequence(SDPBackend.FLASH_ATTENTION, lengths),
        "sdpa": lambda: dense_per_sequence(None, lengths),
        "flex": lambda: flex_document(lengths, device),
        "s2o": lambda: s2o_varlen(lengths, config, cu_seqlens),
        "s2o-paged": lambda: s2o_varlen(
            lengths, config, cu_seqlens, block_table, (k_pages, v_pages)
        ),
    }
    flops = causal_flops(lengths, args.q_heads, args.head_dim)
    rows = []
    for name in args.methods:
        fn = methods[name]()
        out = fn(q, k, v)
        row = dict(method=name, **errors(out, references, lengths))
        if not name.startswith("s2o") and row["rel_err"] > EXACT_TOLERANCE:
            raise SystemExit(f"{name}: relative error {row['rel_err']:.3g} against fp32")
        if name.startswith("s2o"):
            _, stats = fn(q, k, v, return_stats=True)
            sparse = [s for s in stats if s.path == "sparse"]
            row["sparse_seqs"] = f"{len(sparse)}/{len(stats)}"
            tiles = sum(s.dense_tiles for s in sparse)
            row["density"] = (
                sum(s.density * s.dense_tiles for s in sparse) / tiles if tiles else None
            )
        del out
        row["ms"] = median_ms(fn, (q, k, v), warmup=args.warmup, repeats=args.repeats,
                              device=device)  # fmt: skip
        row["tflops"] = flops / row["ms"] / 1e9
        rows.append(row)
        print(row, flush=True)
    baseline = "cudnn" if any(r["method"] == "cudnn" for r in rows) else "sdpa"
    base_ms = next((r["ms"] for r in rows if r["method"] == baseline), None)
    for row in rows:
        row[f"vs_{baseline}"] = base_ms / row["ms"] if base_ms else None
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="+", default=None,
                        choices=sorted(set(GPU_METHODS + CPU_METHODS)),
                        help=f"default: {' '.join(GPU_METHODS)} on a GPU, "
                        f"{' '.join(CPU_METHODS)} on the CPU")  # fmt: skip
    parser.add_argument("--page-size", type=int, default=64)
    parser.add_argument("--config", default="", help="S2OConfig overrides, e.g. min_keys=0")
    parser.add_argument("--q-heads", type=int, default=Q_HEADS)
    parser.add_argument("--kv-heads", type=int, default=KV_HEADS)
    parser.add_argument("--head-dim", type=int, default=HEAD_DIM)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/varlen_speed"))
    args = parser.parse_args(argv)
    if args.methods is None:
        args.methods = list(GPU_METHODS if args.device.startswith("cuda") else CPU_METHODS)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    header = print_run_header(args.device, lengths=" ".join(map(str, args.lengths)))
    rows = run(args)
    write_csv(args.out / "varlen_speed.csv", rows)
    write_json(args.out / "varlen_speed.json", {"header": header, "rows": rows})
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
