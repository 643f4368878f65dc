"""How fast is s2o on the CPU against CPU SDPA?

B=1, Hq=32, Hkv=8, D=128, causal (Llama-3.1-8B's attention shape), on the package's structured
data and on plain random data, bf16 and fp32. Rows: SDPA (PyTorch's CPU flash kernel, oneDNN /
AVX-512 / AMX underneath), s2o at threshold 0 (exact) and s2o at the default config. Columns:
median seconds after a warm-up call, s2o's speedup over SDPA of the same dtype, dense-equivalent
GFLOP/s, density, and the error against fp32 SDPA over all rows (relative L2, the worst head, the
worst block of 128 rows). The header names the CPU, its matrix and vector extensions, and the ISA
PyTorch's own kernels dispatch to; s2o's bf16 tile products run through oneDNN's micro-kernel
(AMX or AVX-512; ``S2O_CPU_MATRIX_UNITS=0`` forces its fp32 loops).

    python -m benchmarks.cpu_speed
    python -m benchmarks.cpu_speed --lengths 8192 16384 32768 --data structured --dtypes bf16
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

import s2o
from benchmarks.attention_speed import causal_flops, errors, make_inputs
from benchmarks.common import (
    REPO_ROOT,
    add_threshold_argument,
    benchmark_config,
    markdown_table,
    median_ms,
    print_run_header,
    write_csv,
    write_json,
)
from s2o import S2OConfig

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
METHODS = ("sdpa", "s2o-exact", "s2o")
# The exact rows must match fp32 attention to their dtype's accuracy over all rows.
EXACT_TOLERANCE = {"bf16": 2e-2, "fp32": 1e-4}
# CPU flags worth naming: the matrix units and the vector extensions the kernels can use.
ISA_FLAGS = ("amx_bf16", "amx_tile", "amx_fp16", "avx512_bf16", "avx512f", "avx2", "fma")


def cpu_description() -> dict[str, str]:
    """The CPU's model name, the ISA_FLAGS it has and the ISA PyTorch's kernels dispatch to."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    return {
        "cpu": model,
        "isa": " ".join(flag for flag in ISA_FLAGS if flag in flags) or "(unknown)",
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "s2o_matrix_units": "off (S2O_CPU_MATRIX_UNITS=0)"
        if os.environ.get("S2O_CPU_MATRIX_UNITS") == "0"
        else "bf16 tile products on oneDNN's micro-kernel where it runs (AMX or AVX-512)",
    }


def method_fn(name: str, config: S2OConfig):
    if name == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True
        )
    point = dataclasses.replace(config, threshold=0.0) if name == "s2o-exact" else config
    return lambda q, k, v, stats=False: s2o.attention(
        q, k, v, is_causal=True, enable_gqa=True, config=point, return_stats=stats
    )


def run(args, config: S2OConfig) -> list[dict]:
    rows = []
    for kind in args.data:
        for n in args.lengths:
            # The yardstick: fp32 SDPA on the bf16 inputs, converted (no N x N buffer on the CPU).
            base = make_inputs(kind, n, device="cpu", dtype=torch.bfloat16)
            with torch.no_grad():
                ref = F.scaled_dot_product_attention(
                    *(t.float() for t in base), is_causal=True, enable_gqa=True
                )
            for dtype_name in args.dtypes:
                q, k, v = (t.to(DTYPES[dtype_name]) for t in base)
                sdpa_ms = None
                for name in args.methods:
                    fn = method_fn(name, config)
                    out = fn(q, k, v)  # also the warm-up
                    error = errors(out, ref)
                    del out
                    if name != "s2o" and error["rel_err"] > EXACT_TOLERANCE[dtype_name]:
                        raise SystemExit(
                            f"{name} at {n} ({kind}, {dtype_name}): relative error "
                            f"{error['rel_err']:.3g} against fp32 attention"
                        )
                    ms = median_ms(fn, (q, k, v), warmup=0, repeats=args.repeats, device="cpu")
                    row = dict(data=kind, length=n, dtype=dtype_name, method=name, s=ms / 1e3)
                    if name == "sdpa":
                        sdpa_ms = ms
                    elif sdpa_ms is not None:
                        row["speedup"] = sdpa_ms / ms
                    row["gflops"] = causal_flops(n) / ms / 1e6
                    if name.startswith("s2o"):
                        _, stats = fn(q, k, v, stats=True)
                        if stats.path != "sparse":
                            raise SystemExit(f"{name} at {n} fell back ({stats.fallback_reason})")
                        row["density"] = stats.density
                        row["stage_s"] = {
                            key: round(val / 1e3, 3) for key, val in stats.time_ms.items()
                        }
                    row.update(
                        rel_err=error["rel_err"],
                        worst_head=error["worst_head"],
                        worst_block=error["worst_block"],
                    )
                    rows.append(row)
                    print(format_row(row), row.get("stage_s", ""), flush=True)
    return rows


COLUMNS = ("data", "length", "dtype", "method", "s", "speedup", "gflops", "density", "rel_err",
           "worst_head", "worst_block")  # fmt: skip


def format_row(row: dict) -> str:
    cells = []
    for col in COLUMNS:
        val = row.get(col, "")
        if isinstance(val, float):
            val = f"{val:.3g}" if col in ("rel_err", "worst_head", "worst_block") else f"{val:.3f}"
        cells.append(f"{val!s:>11}")
    return " ".join(cells)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument(
        "--data", nargs="+", default=["structured", "random"], choices=["structured", "random"]
    )
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row")
    add_threshold_argument(parser)
    parser.add_argument("--out", default=None, help="default results/cpu_speed")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else REPO_ROOT / "results" / "cpu_speed"
    # Not strict: heads over the error budget are recomputed as in a user's call; a fallback
    # to dense SDPA is caught above, never measured as s2o.
    config = benchmark_config(args.threshold)
    header = print_run_header("cpu", **cpu_description(), config=str(config))
    print(" ".join(f"{c:>11}" for c in COLUMNS))
    rows = run(args, config)
    print("\n" + markdown_table(rows, list(COLUMNS)))
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "cpu_speed.csv", rows)
    write_json(out / "cpu_speed.json", {"header": header, "rows": rows})
    print(f"wrote {out}/cpu_speed.csv and .json")


if __name__ == "__main__":
    main()
