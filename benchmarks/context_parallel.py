"""How does s2o scale past one GPU? Context-parallel s2o prefill and a tensor-parallel Llama.

Context parallel (``s2o.distributed.context_parallel_attention``): B=1, Hq=32, Hkv=8, D=128,
bf16, causal, structured or random data, each rank holding its shard (contiguous or zigzag).
Per length and layout: the call's time (CUDA events, median after warm-up, the ranks started
together by a barrier; the slowest rank's median is the call's), every rank's time, the K/V
all-gather's share (communication), peak extra memory per rank, density, the error against
single-GPU s2o on the whole sequence (all rows of every shard) and s2o's own error estimate;
with ``--single`` the single-GPU s2o call on the whole sequence and the speedup over it.

Tensor parallel (``--tp-lengths``): a Llama with Llama-3.1-8B's attention and MLP shapes and
``--tp-layers`` layers of random weights, loaded with ``tp_plan="auto"``, prefill time with
``attn_implementation="s2o"`` and ``"sdpa"``.

    python -m benchmarks.context_parallel --world-size 4 --lengths 262144 1048576
    torchrun --nproc-per-node 4 -m benchmarks.context_parallel --lengths 262144
    python -m benchmarks.context_parallel --world-size 1 --lengths 131072 --tp-lengths 32768

Without ``torchrun`` the script starts ``--world-size`` ranks itself. On a machine without a GPU
the ranks use gloo on the CPU (a smoke test of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import s2o
from benchmarks.attention_speed import (
    HEAD_DIM,
    KV_HEADS,
    Q_HEADS,
    causal_flops,
    make_inputs,
    peak_extra_bytes,
)
from benchmarks.common import (
    Interval,
    benchmark_config,
    markdown_table,
    print_run_header,
    write_csv,
    write_json,
)
from s2o import distributed as cp


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="ranks to start (default: every GPU); ignored under torchrun",
    )
    parser.add_argument("--lengths", type=int, nargs="*", default=[262144])
    parser.add_argument(
        "--layouts", nargs="+", default=["zigzag", "contiguous"], choices=cp.LAYOUTS
    )
    parser.add_argument("--data", default="structured", choices=["structured", "random"])
    parser.add_argument(
        "--single",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time single-GPU s2o on the whole sequence and check against it",
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tp-lengths", type=int, nargs="*", default=[])
    parser.add_argument("--tp-layers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results/context_parallel"))
    return parser.parse_args(argv)  # fmt: skip


def main(argv=None) -> None:
    args = parse_args(argv)
    if "RANK" in os.environ:  # under torchrun
        _rank_main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), None, args)
        return
    world_size = args.world_size or max(1, torch.cuda.device_count())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_rank_main, args=(world_size, port, args), nprocs=world_size,
                       start_method="spawn")  # fmt: skip


def _rank_main(rank: int, world_size: int, port: int | None, args) -> None:
    if port is not None:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    on_gpu = torch.cuda.is_available()
    device = (
        torch.device("cuda", rank % torch.cuda.device_count()) if on_gpu else torch.device("cpu")
    )
    if on_gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if on_gpu else "gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(minutes=10))  # fmt: skip
    try:
        header = print_run_header(device, world_size=str(world_size)) if rank == 0 else None
        rows = [
            _context_parallel_row(n, layout, args, device)
            for n in args.lengths
            for layout in args.layouts
        ]
        tp_rows = [_tensor_parallel_row(n, args, device) for n in args.tp_lengths]
        if rank == 0:
            _report(header, args, rows, tp_rows)
    finally:
        dist.destroy_process_group()


def _timed(fn, args, device):
    """Median ms of fn(*args) over the repeats, every repeat started by a barrier."""
    times = []
    for _ in range(args.warmup + args.repeats):
        dist.barrier()
        interval = Interval(device)
        interval.start()
        fn()
        interval.stop()
        times.append(interval.ms())
    return statistics.median(times[args.warmup :])


def _gathered(value):
    """Every rank's ``value`` (a picklable object), on every rank."""
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _context_parallel_row(length: int, layout: str, args, device) -> dict:
    config = benchmark_config()
    q, k, v = make_inputs(args.data, length, device=device.type)
    q, k, v = (t.to(device) for t in (q, k, v))
    shards = [cp.shard_sequence(t, layout=layout, config=config) for t in (q, k, v)]
    del k, v

    def call():
        return cp.context_parallel_attention(*shards, layout=layout, config=config)

    out, stats = cp.context_parallel_attention(*shards, layout=layout, config=config,
                                               return_stats=True)  # fmt: skip
    # Beyond q, k, v and the output, as attention_speed reports it (the CPU has no counter).
    peak_extra = peak_extra_bytes(call, ()) if device.type == "cuda" else 0
    ms = _timed(call, args, device)
    row = dict(
        length=length, layout=layout, world_size=dist.get_world_size(), data=args.data,
        density=stats.density, est_err=stats.error, gather_ms=stats.time_ms.get("gather"),
        stage_ms=stats.time_ms, rank_ms=ms, peak_extra_gib=peak_extra / 2**30,
    )  # fmt: skip
    if args.single:
        del q
        q, k, v = (t.to(device) for t in make_inputs(args.data, length, device=device.type))
        single = s2o.attention(q, k, v, is_causal=True, enable_gqa=True, config=config)
        expected = cp.shard_sequence(single, layout=layout, config=config).float()
        squared = (out.float() - expected).square().sum()
        reference = expected.square().sum()
        del single, expected
        if dist.get_rank() == 0:
            row["single_ms"] = _timed(
                lambda: s2o.attention(q, k, v, is_causal=True, enable_gqa=True, config=config),
                args, device,
            )  # fmt: skip
        else:  # the other ranks pass the same barriers
            _timed(lambda: None, args, device)
        row["squared"], row["reference"] = float(squared), float(reference)
        del q, k, v
    ranks = _gathered(row)
    merged = dict(ranks[0])
    merged["rank_ms"] = [r["rank_ms"] for r in ranks]
    merged["ms"] = max(merged["rank_ms"])
    merged["tflops"] = causal_flops(length) / merged["ms"] / 1e9
    merged["gather_ms"] = max(r["gather_ms"] or 0.0 for r in ranks)
    merged["stats_call_ms"] = max(sum(r["stage_ms"].values()) for r in ranks)
    merged["comm_share"] = merged["gather_ms"] / merged["stats_call_ms"]
    merged["density"] = [r["density"] for r in ranks]
    merged["peak_extra_gib"] = max(r["peak_extra_gib"] for r in ranks)
    if args.single:
        error = (sum(r["squared"] for r in ranks) / sum(r["reference"] for r in ranks)) ** 0.5
        merged["err_vs_single"] = error
        merged["speedup_vs_single"] = merged["single_ms"] / merged["ms"]
        for name in ("squared", "reference"):
            merged.pop(name)
    merged.pop("stage_ms")
    return merged


def _tensor_parallel_row(length: int, args, device) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from s2o.integrations import transformers as s2o_transformers

    s2o_transformers.set_config(benchmark_config())
    path = Path(tempfile.gettempdir()) / f"s2o-tp-llama-{args.tp_layers}"
    if dist.get_rank() == 0 and not path.exists():
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=1024, hidden_size=Q_HEADS * HEAD_DIM, intermediate_size=14336,
            num_hidden_layers=args.tp_layers, num_attention_heads=Q_HEADS,
            num_key_value_heads=KV_HEADS, max_position_embeddings=max(args.tp_lengths),
            rope_theta=500000.0,
        )  # fmt: skip
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    dist.barrier()
    ids = torch.randint(0, 1024, (1, length), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    row = dict(length=length, world_size=dist.get_world_size(), layers=args.tp_layers)
    for implementation in ("s2o", "sdpa"):
        model = AutoModelForCausalLM.from_pretrained(
            path, tp_plan="auto", attn_implementation=implementation, dtype=torch.bfloat16
        ).eval()
        model.to(device)  # (one rank: transformers leaves an unsharded model where it loaded it)
        with torch.no_grad():
            if implementation == "s2o":
                with s2o_transformers.record_stats() as recorder:
                    model(ids, logits_to_keep=1)
                row["s2o_path"] = recorder.summary()
            row[f"{implementation}_ms"] = _timed(
                lambda model=model: model(ids, logits_to_keep=1), args, device
            )  # fmt: skip
        del model
    row["speedup"] = row["sdpa_ms"] / row["s2o_ms"]
    return row


def _report(header, args, rows, tp_rows) -> None:
    columns = ["length", "layout", "world_size", "ms", "rank_ms", "tflops", "gather_ms",
               "comm_share", "single_ms", "speedup_vs_single", "density", "err_vs_single",
               "est_err", "peak_extra_gib"]  # fmt: skip
    if rows:
        shown = [
            {**row, "rank_ms": " / ".join(f"{ms:.1f}" for ms in row["rank_ms"]),
             "density": " / ".join(f"{d:.3f}" for d in row["density"])}
            for row in rows
        ]  # fmt: skip
        print(markdown_table(shown, [c for c in columns if c in rows[0]]))
        write_csv(args.out / "context_parallel.csv", rows)
    if tp_rows:
        print(markdown_table(tp_rows))
        write_csv(args.out / "tensor_parallel.csv", tp_rows)
    settings = {**vars(args), "out": str(args.out)}
    write_json(args.out / "context_parallel.json",
               dict(header=header, settings=settings, rows=rows, tp_rows=tp_rows))  # fmt: skip


if __name__ == "__main__":
    main()
