"""Real attention, per layer and per head: s2o against the block-sparse family on Q/K/V captured
from a trained model (SmolLM2-135M-Instruct, s2o.models) reading real text (s2o.texts).

For each text and length: one prefill forward captures the post-RoPE Q/K/V of every layer
(s2o.capture), the layers are stacked as heads, and benchmarks/quality.py's comparison runs on
them (s2o's threshold sweep and every block baseline including the oracle, error against density,
ratios at matched density and error). On top, at s2o's default point: a per-head table (the worst
heads first), per-layer density and error with per-layer ratios against the oracle and the best
baselines, and a layer x head heat map of error and density. Errors are relative L2 over all
rows of a head (or layer) against fp32 dense attention.

    python -m benchmarks.model_heads                                 # 2K, 4K, 8K; three texts
    python -m benchmarks.model_heads --lengths 32768 --texts prose --rope-scaling 4 \\
        --layers 3 14 18 19 23 26                                    # beyond the trained context
    python -m benchmarks.model_heads --text-file my.txt --lengths 4096

Results go to ``--out`` (default results/model_heads/), one folder per text and length with
``heads.csv``, ``layers.csv``, ``heatmap.png`` and quality.py's curve and ratio files, and
``summary.json`` beside them.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from benchmarks import baselines, quality
from benchmarks.common import (
    REPO_ROOT,
    benchmark_texts,
    markdown_table,
    print_run_header,
    write_csv,
    write_json,
)
from benchmarks.inputs import Inputs
from benchmarks.matching import BOUND_SIGNS, ORACLE, compare_curves, geomean
from benchmarks.plots import pyplot
from benchmarks.s2o_curve import DEFAULT_THRESHOLD
from s2o import models, texts
from s2o.capture import capture_attention

BUDGET_LINES = (0.05, 0.10)  # error levels counted in the summaries


def captured_inputs(model, tokenizer, text: str, name: str, length: int, layers) -> Inputs:
    """The model's post-RoPE Q/K/V of ``layers`` on the first ``length`` tokens of ``text``,
    layers stacked as heads (head_kinds: ``layer<L>``)."""
    ids = texts.text_input_ids(tokenizer, text, length, name=name)
    captured = capture_attention(model, ids, layers)
    parts = [captured[layer] for layer in sorted(captured)]
    scales = {c.scale for c in parts}
    if len(scales) > 1:
        raise ValueError(f"captured layers use different softmax scales {scales}")
    q, k, v = (torch.cat([getattr(c, t) for c in parts], dim=1) for t in ("query", "key", "value"))
    kinds = [f"layer{c.layer}" for c in parts for _ in range(c.query.shape[1])]
    inputs_name = f"SmolLM2-135M {name} N={length}"
    return Inputs(inputs_name, q.contiguous(), k.contiguous(), v.contiguous(), scales.pop(),
                          kinds)  # fmt: skip


def _layer_points(
    points: list[baselines.CurvePoint], layer_heads: list[int], reference_sq: list[float], numel
) -> list[baselines.CurvePoint]:
    """The points of one method restricted to the heads of one layer."""
    ref = sum(reference_sq[h] for h in layer_heads)
    out = []
    for p in points:
        squared = sum(p.head_mse[h] for h in layer_heads) * numel
        out.append(
            baselines.CurvePoint(
                method=p.method,
                knob=p.knob,
                value=p.value,
                density=sum(p.head_density[h] for h in layer_heads) / len(layer_heads),
                mse=squared / (numel * len(layer_heads)),
                rel_l2=math.sqrt(squared / ref) if ref > 0 else 0.0,
            )
        )
    return out


def head_rows(inputs, result, point: baselines.CurvePoint, mass) -> list[dict]:
    """One row per head at s2o's default point: layer, head, density, relative error."""
    numel = inputs.query.shape[2] * inputs.query.shape[3]
    rows, per_layer_head = [], {}
    for h, kind in enumerate(inputs.head_kinds):
        head_in_layer = per_layer_head.get(kind, 0)
        per_layer_head[kind] = head_in_layer + 1
        ref = result.head_reference_sq[h]
        rows.append(
            {
                "layer": int(kind.removeprefix("layer")),
                "head": head_in_layer,
                "density": point.head_density[h],
                "rel_l2": math.sqrt(point.head_mse[h] * numel / ref) if ref > 0 else 0.0,
                "top1%_mass": float(mass[h, 0]),
            }
        )
    return rows


def layer_rows(inputs, result, default_threshold: float) -> tuple[list[dict], dict]:
    """Per layer: s2o's density and error at the default, and the ratios (baseline / s2o) at
    matched density (MSE) and matched error (density) against the oracle, the best and the
    best published-style baseline; plus the geometric means over layers."""
    numel = inputs.query.shape[2] * inputs.query.shape[3]
    s2o_points = result.curves["s2o"]
    others = {k: v for k, v in result.curves.items() if not k.startswith("s2o") and k != "dense"}
    rows = []
    for kind in dict.fromkeys(inputs.head_kinds):
        heads = [h for h, k in enumerate(inputs.head_kinds) if k == kind]
        mine = _layer_points(s2o_points, heads, result.head_reference_sq, numel)
        theirs = {
            name: _layer_points(pts, heads, result.head_reference_sq, numel)
            for name, pts in others.items()
        }
        ratios = compare_curves(mine, theirs)
        at = next(p for p in mine if p.value == default_threshold)
        row = {"layer": int(kind.removeprefix("layer")), "density": at.density, "rel_l2": at.rel_l2}
        for r in ratios:
            if r["threshold"] != default_threshold:
                continue
            if r["baseline"] in (ORACLE, "best", "best-published"):
                sign = BOUND_SIGNS
                row[f"{r['baseline']} mse_ratio"] = f"{sign[r['error_match']]}{r['mse_ratio']:.3g}"
                row[f"{r['baseline']} density_ratio"] = (
                    f"{sign[r['density_match']]}{r['density_ratio']:.3g}"
                )
                row[f"_{r['baseline']}_density"] = r["density_ratio"]
                row[f"_{r['baseline']}_mse"] = r["mse_ratio"]
        rows.append(row)
    geomeans = {
        f"{name} {what}_ratio": geomean([r.get(f"_{name}_{what}", math.nan) for r in rows])
        for name in (ORACLE, "best", "best-published")
        for what in ("mse", "density")
    }
    for r in rows:
        for key in [k for k in r if k.startswith("_")]:
            del r[key]
    return rows, geomeans


def error_summary(rows: list[dict]) -> dict:
    errors = sorted(r["rel_l2"] for r in rows)
    n = len(errors)
    worst = max(rows, key=lambda r: r["rel_l2"])
    summary = {
        "heads": n,
        "median": errors[n // 2],
        "p90": errors[min(n - 1, math.ceil(0.9 * n) - 1)],
        "worst": worst["rel_l2"],
        "worst_head": f"layer {worst['layer']} head {worst['head']}",
        "mean_density": sum(r["density"] for r in rows) / n,
    }
    for line in BUDGET_LINES:
        summary[f"above_{line:.0%}"] = sum(e > line for e in errors)
    return summary


def plot_heatmap(rows: list[dict], path: Path, title: str) -> None:
    plt = pyplot()
    layers = sorted({r["layer"] for r in rows})
    heads = max(r["head"] for r in rows) + 1
    error = torch.full((len(layers), heads), math.nan)
    density = torch.full((len(layers), heads), math.nan)
    for r in rows:
        error[layers.index(r["layer"]), r["head"]] = r["rel_l2"]
        density[layers.index(r["layer"]), r["head"]] = r["density"]
    fig, axes = plt.subplots(1, 2, figsize=(10, max(4, 0.25 * len(layers) + 1.5)))
    for ax, values, name, scale in (
        (axes[0], error.clamp_min(1e-4).log10(), "log10 relative L2 error", (-3, 0)),
        (axes[1], density, "density", (0, 1)),
    ):
        image = ax.imshow(values.numpy(), aspect="auto", cmap="magma", vmin=scale[0], vmax=scale[1])
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=6)
        ax.set_title(name, fontsize=9)
        fig.colorbar(image, ax=ax)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--texts", nargs="+", default=list(texts.TEXT_KINDS),
                        choices=texts.TEXT_KINDS)  # fmt: skip
    parser.add_argument("--text-file", default=None, help="your own text instead of --texts")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="default: all")
    parser.add_argument(
        "--rope-scaling",
        type=float,
        default=None,
        help="linear RoPE factor (beyond the trained 8K context); default: none up to 8K, "
        "length / 8192 beyond",
    )
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(quality.THRESHOLDS))
    parser.add_argument("--s2o-variants", nargs="*", default=[])
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--chunk-elements", type=int, default=1 << 25)
    parser.add_argument("--out", default=None, help="default results/model_heads")
    args = parser.parse_args(argv)
    args.thresholds = sorted(set(args.thresholds) | {DEFAULT_THRESHOLD})
    args.out = Path(args.out) if args.out else REPO_ROOT / "results" / "model_heads"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_float32_matmul_precision("highest")
    header = print_run_header("cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    runs, failures, loaded = [], [], {}
    for length in args.lengths:
        factor = args.rope_scaling
        if factor is None and length > models.SMOLLM2_TRAINED_CONTEXT:
            factor = length / models.SMOLLM2_TRAINED_CONTEXT
        if factor not in loaded:
            loaded.clear()
            loaded[factor] = models.load_smollm2(rope_scaling=factor)
        model, tokenizer = loaded[factor]
        layers = args.layers or list(range(model.config.num_hidden_layers))
        for kind, (text, source) in benchmark_texts(args.texts, args.text_file).items():
            start = time.perf_counter()
            inputs = captured_inputs(model, tokenizer, text, kind, length, layers)
            tag = f"{kind}_N{length}" + (f"_rope{factor:g}" if factor else "")
            run_dir = args.out / tag
            run_dir.mkdir(parents=True, exist_ok=True)
            result = quality.run_length(inputs, args, run_dir)
            mass = _mass_shares(inputs)
            point = next(p for p in result.curves["s2o"] if p.value == DEFAULT_THRESHOLD)
            heads = head_rows(inputs, result, point, mass)
            layers_table, geomeans = layer_rows(inputs, result, DEFAULT_THRESHOLD)
            summary = error_summary(heads)
            beyond = f", RoPE linear x{factor:g} (beyond the trained 8K context)" if factor else ""
            title = f"SmolLM2-135M, {kind} text, N={length}{beyond}: s2o default"
            write_csv(run_dir / "heads.csv", heads)
            write_csv(run_dir / "layers.csv", layers_table)
            plot_heatmap(heads, run_dir / "heatmap.png", title)
            worst = sorted(heads, key=lambda r: -r["rel_l2"])[:10]
            print(f"\n### {title} ({time.perf_counter() - start:.0f} s; text: {source})\n")
            print(markdown_table([summary]))
            print("\nWorst heads:\n")
            print(markdown_table(worst))
            print("\nPer layer (ratios baseline / s2o at the default point):\n")
            print(markdown_table(layers_table))
            print("\nGeometric means over layers:\n")
            print(markdown_table([geomeans]))
            failures += [f"{tag}: {f}" for f in quality.check_curves(result.curves, result.floor)]
            runs.append(
                {
                    "text": kind,
                    "source": source,
                    "length": length,
                    "rope_scaling": factor,
                    "summary": summary,
                    "layer_ratio_geomeans": geomeans,
                    "ratio_summary": result.summary,
                    "layers": layers_table,
                    "worst_heads": worst,
                    "seconds": result.seconds,
                }
            )
            del inputs, result
    write_json(args.out / "summary.json", {"header": header, "runs": runs})
    if failures:
        print("\nCHECKS FAILED:\n" + "\n".join(f"- {f}" for f in failures))
        return 1
    return 0


def _mass_shares(inputs) -> torch.Tensor:
    from s2o import data

    return data.attention_mass_stats(inputs.query, inputs.key).cpu()


if __name__ == "__main__":
    sys.exit(main())
