"""Quality benchmark: error vs density of s2o against block-sparse baselines on the same inputs.

For each length: the inputs' attention statistics; every baseline of benchmarks/baselines.py swept
over its knob; s2o swept over ``S2OConfig.threshold`` (the tail threshold in proportion:
benchmarks.common.at_threshold); the s2o error ratio at matched density and
density ratio at matched error against each baseline, the best non-oracle baseline at each point
and the oracle; CSV/JSON tables and PNG plots; then ablations of s2o's knobs on one length; then
self-checks (monotone curves, files written), exiting non-zero when one fails.

Commands (from the repository root):

    python -m benchmarks.quality --smoke                   # CPU: 4K (16 heads), 8K (8 heads)
    python -m benchmarks.quality --device cuda --lengths 32768 65536 131072 \\
        --ablation-length 32768 --s2o-variants ordering=kv_head
    python -m benchmarks.quality --device cuda --model PATH --text-file FILE --layers 0 15 31 \\
        --lengths 32768                                   # Q/K/V captured from a local model

Results go to ``--out`` (default ``results/quality/<tag>``).

Matching [ours]: each curve is reduced to its Pareto front (points by density; a point is kept
only if its error is below that of every sparser point), and error and density are interpolated
linearly in log-log between neighbouring front points. Where s2o's point lies outside a
baseline's range, the value at the nearest end of the front is used and the ratio is flagged as a
bound (``>=`` or ``<=``); summaries (geometric means) use in-range points only, and leave out
s2o points whose error is within 4x of the output-rounding floor (dense attention rounded to the
input dtype), where every method is equal. The pseudo-baseline ``best`` is, at each s2o point, the
best non-oracle baseline there; ``best-published`` leaves out ``pbs-qseg-*``, our own PBS variant
that ranks keys with s2o's per-segment mean query (PBS-Attn itself uses one global importance).
MSE ratios at matched density are the squares of relative-L2 ratios (same reference), and the
density ratio at matched MSE is the one at matched relative L2.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks import baselines
from benchmarks.ablations import check_ablations, run_ablations
from benchmarks.common import (
    REPO_ROOT,
    benchmark_config,
    markdown_table,
    parse_config_overrides,
    print_run_header,
    write_csv,
    write_json,
)
from benchmarks.inputs import Inputs, captured_inputs, mass_stats, structured_inputs
from benchmarks.matching import ORACLE, compare_curves, head_kind_table, summarise_ratios
from benchmarks.plots import plot_ablations, plot_attention_map, plot_curves
from benchmarks.s2o_curve import DEFAULT_THRESHOLD, s2o_curve

THRESHOLDS = (0.0, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3)
ABLATION_THRESHOLDS = (0.003, 0.01, 0.03, 0.1)
# --smoke: CPU preset that runs in about 2.5 minutes on 2 idle cores. KV groups 0, 1, 4, 6 of the
# default 32-head shape hold every head type (streaming, retrieval, slash, diffuse), as do 0, 4.
SMOKE_RUNS = ((4096, [0, 1, 4, 6]), (8192, [0, 4]))
SMOKE_THRESHOLDS = (0.0, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3)
SMOKE_ABLATION = (4096, [0, 4])


# --------------------------------------------------------------------------------------------
# Checks


def check_curves(
    curves: dict[str, list[baselines.CurvePoint]], floor: float, tolerance: float = 0.05
) -> list[str]:
    """Properties the curves must have; returns the failures (empty: all good).

    - every density in (0, 1] and every error finite;
    - dense, and s2o at threshold 0, at density 1 and at the rounding floor (rel L2 < 1%);
    - s2o: density non-increasing as the threshold grows (exactly), MSE non-decreasing
      (within ``tolerance``);
    - window, top-k and top-CDF: density non-decreasing in the knob (exactly: larger knobs select
      supersets);
    - oracle: MSE non-increasing in density (within ``tolerance``, above 2x the floor).
    """
    failures = []
    for name, points in curves.items():
        for p in points:
            if not (0 < p.density <= 1 + 1e-9) or not math.isfinite(p.mse):
                failures.append(f"{name} {p.knob}={p.value}: density {p.density}, mse {p.mse}")
        if name == "dense" or (name.startswith("s2o") and points[0].value == 0):
            p = points[0]
            if abs(p.density - 1) > 1e-9 or p.rel_l2 > 0.01:
                failures.append(
                    f"{name} {p.knob}={p.value}: density {p.density}, rel_l2 "
                    f"{p.rel_l2} (expected dense)"
                )
        ordered = sorted(points, key=lambda p: p.value)
        pairs = list(zip(ordered, ordered[1:], strict=False))
        if name.startswith("s2o"):
            for a, b in pairs:
                if b.density > a.density + 1e-12:
                    failures.append(
                        f"{name}: density rises from {a.density:.4f} at threshold "
                        f"{a.value} to {b.density:.4f} at {b.value}"
                    )
                if b.mse < (1 - tolerance) * a.mse and a.mse > 2 * floor:
                    failures.append(
                        f"{name}: MSE falls from {a.mse:.3e} at threshold {a.value} "
                        f"to {b.mse:.3e} at {b.value}"
                    )
        elif name != ORACLE and name != "dense":
            for a, b in pairs:
                if b.density < a.density - 1e-12:
                    failures.append(
                        f"{name}: density falls from {a.density:.4f} at {a.knob}="
                        f"{a.value} to {b.density:.4f} at {b.value}"
                    )
        if name == ORACLE:
            by_density = sorted(points, key=lambda p: p.density)
            for a, b in zip(by_density, by_density[1:], strict=False):
                if b.mse > (1 + tolerance) * a.mse and b.mse > 2 * floor:
                    failures.append(
                        f"oracle: MSE rises from {a.mse:.3e} at density "
                        f"{a.density:.4f} to {b.mse:.3e} at {b.density:.4f}"
                    )
    return failures


def check_files(paths: list[Path]) -> list[str]:
    return [
        f"missing or empty output {p}" for p in paths if not p.exists() or p.stat().st_size == 0
    ]


# --------------------------------------------------------------------------------------------
# Driver


def _curve_rows(curves: dict[str, list[baselines.CurvePoint]]) -> list[dict]:
    return [
        {
            "method": p.method,
            "knob": p.knob,
            "value": p.value,
            "density": p.density,
            "mse": p.mse,
            "rel_l2": p.rel_l2,
        }
        for points in curves.values()
        for p in points
    ]


def dense_reference(inputs: Inputs, block: int, chunk_elements: int) -> torch.Tensor:
    """fp32 dense attention output [B, Hq, N, D], computed in chunks."""
    dense = [m for m in baselines.default_methods(inputs.length, block) if m.kind == "dense"]
    return baselines.evaluate_baselines(
        inputs.query,
        inputs.key,
        inputs.value,
        dense,
        block=block,
        scale=inputs.scale,
        chunk_elements=chunk_elements,
    ).reference


@dataclass
class LengthResult:
    inputs_name: str
    length: int
    curves: dict[str, list[baselines.CurvePoint]]
    ratio_rows: list[dict]
    summary: list[dict]
    head_kinds: list[dict]
    mass: list[dict]
    floor: float
    seconds: dict[str, float]
    files: list[Path]
    # [B * Hq] fp64: squared norm of each head's fp32 dense output (per-head relative errors).
    head_reference_sq: list[float] = field(default_factory=list)


def run_length(inputs: Inputs, args, out_dir: Path) -> LengthResult:
    """Baselines, the s2o sweeps, ratios, tables and the plot for one input."""
    n = inputs.length
    seconds = {}
    print(f"\n## {inputs.name}")
    mass = mass_stats(inputs)
    print("\nShare of softmax mass in the top keys (last 64 rows), by head kind:\n")
    print(markdown_table(mass))

    start = time.perf_counter()
    methods = baselines.default_methods(n, args.block)
    result = baselines.evaluate_baselines(
        inputs.query,
        inputs.key,
        inputs.value,
        methods,
        block=args.block,
        scale=inputs.scale,
        chunk_elements=args.chunk_elements,
    )
    seconds["baselines"] = time.perf_counter() - start
    baseline_curves: dict[str, list[baselines.CurvePoint]] = {}
    for p in result.points:
        baseline_curves.setdefault(p.method, []).append(p)
    floor = baseline_curves["dense"][0].mse
    compared = {k: v for k, v in baseline_curves.items() if k != "dense"}
    print(
        f"\nBaselines: {seconds['baselines']:.1f} s. Rounding floor (dense attention rounded to "
        f"{inputs.query.dtype}): MSE {floor:.3e}."
    )

    s2o_curves, rows, summary, kinds = {}, [], [], []
    for spec in [""] + args.s2o_variants:
        name = f"s2o[{spec}]" if spec else "s2o"
        start = time.perf_counter()
        points = s2o_curve(
            inputs, result.reference, args.thresholds, name=name, **parse_config_overrides(spec)
        )
        seconds[name] = time.perf_counter() - start
        s2o_curves[name] = points
        these_rows = compare_curves(points, compared)
        these_summary = summarise_ratios(these_rows, floor)
        rows += [dict(r, s2o=name) for r in these_rows]
        summary += [dict(s, s2o=name) for s in these_summary]
        print(f"\n### {name} ({seconds[name]:.1f} s)\n")
        print(markdown_table(_curve_rows({name: points}), ["value", "density", "mse", "rel_l2"]))
        print(
            "\nRatios (baseline / s2o; > 1: s2o better): MSE at s2o's density, density at s2o's "
            f"MSE; '@default': threshold {DEFAULT_THRESHOLD}; geomean over s2o's points in range:"
            "\n"
        )
        print(markdown_table(these_summary))
        at_default = next((p for p in points if p.value == DEFAULT_THRESHOLD), points[0])
        best = next(
            (
                r
                for r in these_rows
                if r["baseline"] == "best" and r["threshold"] == at_default.value
            ),
            None,
        )
        names = [ORACLE] + ([best["best_at_density"]] if best else [])
        these_kinds = head_kind_table(inputs, at_default, compared, names)
        kinds += [dict(k, s2o=name) for k in these_kinds]
        print(
            f"\nPer head kind at {name}'s default point (density {at_default.density:.3f}), and "
            f"{' and '.join(names)} at the same overall density: mean density and MSE\n"
        )
        print(markdown_table(these_kinds))
    head_reference_sq = result.reference.double().square().sum(dim=(2, 3)).flatten().tolist()
    del result
    curves = {**s2o_curves, **baseline_curves}

    tag = f"N{n}"
    files = [
        out_dir / f"curves_{tag}.csv",
        out_dir / f"ratios_{tag}.csv",
        out_dir / f"mass_{tag}.csv",
        out_dir / f"head_kinds_{tag}.csv",
        out_dir / f"curves_{tag}.png",
    ]
    write_csv(files[0], _curve_rows(curves))
    write_csv(files[1], rows)
    write_csv(files[2], mass)
    write_csv(files[3], kinds)
    plot_curves(
        curves,
        files[4],
        f"{inputs.name}: error vs density (baselines: tiles {args.block}x{args.block}; s2o: its "
        "own tile units)",
    )
    return LengthResult(
        inputs.name, n, curves, rows, summary, kinds, mass, floor, seconds, files, head_reference_sq
    )


def make_inputs(args, length: int, kv_groups) -> Inputs:
    if args.model:
        return captured_inputs(
            args.model, args.text_file, length, args.layers, args.device, args.block
        )
    return structured_inputs(
        length,
        q_heads=args.q_heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        kv_groups=kv_groups,
        seed=args.seed,
        device=args.device,
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CPU preset (SMOKE_RUNS): 4K with 16 query heads, 8K with 8, ablations at 4K with 8; "
        "explicit --thresholds, --s2o-variants still apply",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="*",
        default=[32768, 65536, 131072],
        help="lengths of the method comparison (none: only ablations)",
    )
    parser.add_argument(
        "--kv-groups",
        type=int,
        nargs="+",
        default=None,
        help="keep only these KV groups (and their query heads)",
    )
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="local HF causal LM: capture its Q/K/V")
    parser.add_argument("--text-file", default=None, help="text for --model")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, -1])
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS))
    parser.add_argument(
        "--s2o-variants",
        nargs="*",
        default=[],
        help="more s2o curves, each S2OConfig overrides like ordering=kv_head,segment_size=128",
    )
    parser.add_argument("--ablation-length", type=int, default=32768, help="0: no ablations")
    parser.add_argument("--ablation-kv-groups", type=int, nargs="+", default=None)
    parser.add_argument(
        "--ablation-groups",
        nargs="+",
        default=None,
        help="run only these ablation groups (e.g. 'representative'; default: all)",
    )
    parser.add_argument(
        "--ablation-thresholds", type=float, nargs="+", default=list(ABLATION_THRESHOLDS)
    )
    parser.add_argument("--map-length", type=int, default=4096, help="0: no attention map")
    parser.add_argument(
        "--map-head",
        type=int,
        default=None,
        help="query head of the map (default: the first retrieval head)",
    )
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument(
        "--chunk-elements",
        type=int,
        default=None,
        help="logit entries per baseline chunk (default 2^25 CPU, 2^28 CUDA)",
    )
    parser.add_argument("--out", default=None, help="default results/quality/<tag>")
    parser.add_argument("--tag", default=None, help="default: smoke, or full")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device = "cpu"
        args.runs = list(SMOKE_RUNS)
        args.ablation_length, args.ablation_kv_groups = SMOKE_ABLATION
        if args.thresholds == list(THRESHOLDS):
            args.thresholds = list(SMOKE_THRESHOLDS)
    else:
        args.runs = [(n, args.kv_groups) for n in args.lengths]
    if args.model and not args.text_file:
        parser.error("--model needs --text-file")
    # The reports compare at the default threshold: always measure it.
    args.thresholds = sorted(set(args.thresholds) | {DEFAULT_THRESHOLD})
    args.ablation_thresholds = sorted(set(args.ablation_thresholds) | {DEFAULT_THRESHOLD})
    if args.chunk_elements is None:
        args.chunk_elements = 1 << (28 if args.device.startswith("cuda") else 25)
    args.tag = args.tag or ("smoke" if args.smoke else "full")
    args.out = Path(args.out) if args.out else REPO_ROOT / "results" / "quality" / args.tag
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # The fp32 reference and the baselines' matmuls must be true fp32 (no TF32 on GPUs).
    torch.set_float32_matmul_precision("highest")
    wall = time.perf_counter()
    header = print_run_header(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    failures, files, lengths, extra = [], [], [], {}

    for length, kv_groups in args.runs:
        inputs = make_inputs(args, length, kv_groups)
        result = run_length(inputs, args, args.out)
        failures += [f"N={length}: {f}" for f in check_curves(result.curves, result.floor)]
        files += result.files
        lengths.append(result)
        if args.map_length and not extra.get("attention_map"):
            head = args.map_head
            if head is None:
                head = next((h for h, k in enumerate(inputs.head_kinds) if k == "retrieval"), 0)
            path = args.out / f"attention_map_h{head}.png"
            map_length = min(args.map_length, length)
            extra["attention_map"] = plot_attention_map(
                inputs, head, map_length, benchmark_config(sparse_pass_only=True), path
            )
            files.append(path)
        del inputs

    ablation_rows = []
    if args.ablation_length:
        start = time.perf_counter()
        inputs = make_inputs(args, args.ablation_length, args.ablation_kv_groups)
        reference = dense_reference(inputs, args.block, args.chunk_elements)
        floor = float(
            (reference.to(inputs.query.dtype).float() - reference).double().square().mean()
        )
        curves, ablation_rows = run_ablations(
            inputs, reference, args.ablation_thresholds, floor, args.ablation_groups
        )
        tag = f"N{args.ablation_length}"
        paths = [
            args.out / f"ablations_{tag}.csv",
            args.out / f"ablations_{tag}.png",
            args.out / f"ablation_curves_{tag}.csv",
        ]
        write_csv(paths[0], ablation_rows)
        plot_ablations(curves, paths[1], f"ablations: {inputs.name}")
        write_csv(paths[2], _curve_rows(curves))
        files += paths
        failures += check_ablations(curves)
        extra["ablation_inputs"] = inputs.name
        extra["ablation_seconds"] = time.perf_counter() - start
        print(f"\n## Ablations on {inputs.name} ({extra['ablation_seconds']:.1f} s)\n")
        print(
            "Gains > 1: the variant beats the default (MSE at matched density, density at "
            "matched MSE; geometric means over the default's points in range).\n"
        )
        print(markdown_table(ablation_rows))

    summary_path = args.out / "summary.json"
    extra["seconds_total"] = time.perf_counter() - wall
    write_json(
        summary_path,
        {
            "header": header,
            "args": {k: str(v) for k, v in vars(args).items()},
            "lengths": [
                {
                    "inputs": r.inputs_name,
                    "length": r.length,
                    "rounding_floor_mse": r.floor,
                    "seconds": r.seconds,
                    "mass_shares": r.mass,
                    "ratio_summary": r.summary,
                    "head_kinds": r.head_kinds,
                    "curves": _curve_rows(r.curves),
                }
                for r in lengths
            ],
            "ablations": ablation_rows,
            **extra,
        },
    )
    failures += check_files(files + [summary_path])
    print(f"\nWrote {len(files) + 1} files to {args.out}; total {extra['seconds_total']:.1f} s.")
    if failures:
        print("\nCHECKS FAILED:\n" + "\n".join(f"- {f}" for f in failures))
        return 1
    print("All checks passed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
