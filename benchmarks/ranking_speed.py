"""How long does the ranking take? The estimate (importance scores) and permute (ranked index
lists) ops timed alone, for one KV group at the default config.

Hq/Hkv query heads of one KV group (4 at the Llama-3.1-8B shape) against its KV head, D 128,
bf16, causal, the package's structured data; the default S2OConfig (its ordering decides how many
ranked lists: one per query head by default). Median ms of CUDA events (wall clock on the CPU)
after a warm-up, each op alone; the estimate's equivalent fp32 TFLOP/s (two products per score
with the variance term, one without); the scores' checksum, to compare builds.

    python -m benchmarks.ranking_speed                            # 32K, 128K on a GPU
    python -m benchmarks.ranking_speed --lengths 262144 --config ordering=kv_head
    python -m benchmarks.ranking_speed --device cpu --lengths 4096
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import s2o
from benchmarks.common import (
    markdown_table,
    median_ms,
    parse_config_overrides,
    print_run_header,
    write_json,
)
from s2o import data
from s2o.plan import Plan

GROUP, HEAD_DIM = 4, 128


def run(args) -> list[dict]:
    config = s2o.S2OConfig(**parse_config_overrides(args.config))
    rows = []
    for n in args.lengths:
        q, k, _ = data.structured_qkv(
            n, q_heads=GROUP, kv_heads=1, head_dim=HEAD_DIM, device=args.device
        )
        plan = Plan.for_call(config, q.shape, k.shape, is_causal=True)
        timing = dict(warmup=1, repeats=args.repeats, device=args.device)
        estimate_ms = median_ms(plan.estimate, (q, k), **timing)
        scores = plan.estimate(q, k)
        permute_ms = median_ms(plan.permute, (scores,), **timing)
        products = 2 if plan.score_variance > 0 else 1
        flops = 2.0 * scores.numel() * HEAD_DIM * products
        row = dict(
            length=n,
            lists=scores.shape[1],
            estimate_ms=estimate_ms,
            permute_ms=permute_ms,
            estimate_tflops=flops / estimate_ms / 1e9,
            scores_gib=scores.numel() * 4 / 2**30,
            checksum=float(scores.double().sum()),
        )
        rows.append(row)
        print(row, flush=True)
        del scores
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", default="", help="S2OConfig overrides, e.g. ordering=kv_head")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("results/ranking_speed"))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    header = print_run_header(args.device, lengths=" ".join(map(str, args.lengths)))
    rows = run(args)
    write_json(args.out / "ranking_speed.json", {"header": header, "rows": rows})
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
