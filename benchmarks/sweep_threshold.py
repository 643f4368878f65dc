"""Density and error of s2o against the threshold (the tail threshold in proportion) at long
lengths (GPU), plus the structured data's attention-mass statistics: a quick look before the full
quality benchmark. Errors over all rows against an fp32 reference, with the worst head and the
worst block of rows.

    python -m benchmarks.sweep_threshold --lengths 32768 131072 --thresholds 0.001 0.003 0.01 0.03
    python -m benchmarks.sweep_threshold --variants "" "patience=2" "segment_size=128,block_m=32"
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import s2o
from benchmarks.attention_speed import errors
from benchmarks.common import (
    benchmark_config,
    dense_reference,
    parse_config_overrides,
    print_run_header,
    write_json,
)
from s2o import data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.001, 0.003, 0.01, 0.03])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[""],
        help="S2OConfig overrides per variant, e.g. 'patience=2,ordering=kv_head'",
    )
    parser.add_argument("--out", type=Path, default=Path("results/sweep"))
    args = parser.parse_args()
    header = print_run_header("cuda")
    rows = []
    for n in args.lengths:
        q, k, v = data.structured_qkv(n, dtype=torch.bfloat16, device="cuda")
        shares = data.attention_mass_stats(q, k).cpu()
        kinds = [p.kind for p in data.head_profiles(q.shape[1])]
        for kind in sorted(set(kinds)):
            sel = torch.tensor([x == kind for x in kinds])
            top = [round(float(v), 3) for v in shares[sel].mean(0)]
            print(f"# {n}: {kind:>9} heads, mass in top 1/3/10% of keys: {top}")
        ref = dense_reference(q, k, v)
        for variant in args.variants:
            for threshold in args.thresholds:
                overrides = parse_config_overrides(variant)
                config = benchmark_config(threshold, sparse_pass_only=True, **overrides)
                out, stats = s2o.attention(
                    q, k, v, is_causal=True, enable_gqa=True, config=config, return_stats=True
                )
                row = dict(
                    length=n,
                    variant=variant or "default",
                    threshold=threshold,
                    tail_threshold=config.tail_threshold,
                    density=stats.density,
                    **errors(out, ref),
                    ms=sum(stats.time_ms.values()),
                )
                del out
                rows.append(row)
                print(
                    " ".join(
                        f"{key}={val:.4g}" if isinstance(val, float) else f"{key}={val}"
                        for key, val in row.items()
                    ),
                    flush=True,
                )
        del q, k, v
        torch.cuda.empty_cache()
    write_json(args.out / "sweep_threshold.json", {"header": header, "rows": rows})


if __name__ == "__main__":
    main()
