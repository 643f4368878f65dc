"""Ablations: s2o's knobs varied one at a time from the default on one input, each curve against
the default's."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

import s2o
from benchmarks import baselines
from benchmarks.inputs import Inputs
from benchmarks.matching import compare_curves, summarise_ratios
from benchmarks.s2o_curve import DEFAULT_THRESHOLD, s2o_curve


@dataclass
class Variant:
    """One ablation: S2OConfig overrides, or a representative scored in Python."""

    group: str
    label: str
    overrides: dict = field(default_factory=dict)
    representative: str | None = None


def ablation_variants(group_size: int = 4) -> list[Variant]:
    """s2o knobs varied one at a time from the default configuration (values equal to the
    default are skipped). ``check`` runs the default ranking through the Python scoring path: it
    must reproduce ``default``."""
    default = s2o.S2OConfig()
    default_block_m = default.resolve_block_m(group_size)

    def knob(name: str, values) -> list[Variant]:
        current = default_block_m if name == "block_m" else getattr(default, name)
        return [Variant(name, str(v), {name: v}) for v in values if v != current]

    return [
        Variant("default", "default"),
        Variant("check", "mean, scored in Python", representative="mean"),
        *(
            Variant("ordering", value, {"ordering": value})
            for value in ("kv_head", "query_head")
            if value != default.ordering
        ),
        *knob("segment_size", (128, 256, 512)),
        *knob("patience", (1, 2)),
        *knob("rank_bits", (32, 16, 10)),
        *knob("block_n", (32, 64, 128)),
        *knob("block_m", (16, 32, 64)),
        Variant("representative", "head-max", representative="head-max"),
        Variant("representative", "sub-mean-max", representative="sub-mean-max"),
        # Not an estimate: each key's true mass over the segment, the bound of any ranking.
        Variant("representative", "true mass (oracle)", representative="true-mass"),
    ]


def run_ablations(inputs: Inputs, reference: torch.Tensor, thresholds, floor: float, groups=None):
    """Every variant's curve (or those of the given groups; the default and the check always
    run), and per variant its gains over the default curve: the default's MSE / the variant's at
    matched density and the default's density / the variant's at matched error (geometric means
    over the points in range; > 1: the variant is better). A variant the device's kernel does not
    take (the CUDA kernel: block_n 64 only, at most 128 rows per work unit) gets a row saying so."""
    curves, rows = {}, []
    default = None
    group_size = inputs.query.shape[1] // inputs.key.shape[1]
    thresholds = sorted(set(thresholds) | {DEFAULT_THRESHOLD})  # rows report the default's point
    for variant in ablation_variants(group_size):
        if groups and variant.group not in (*groups, "default", "check"):
            continue
        start = time.perf_counter()
        try:
            points = s2o_curve(
                inputs,
                reference,
                thresholds,
                name=variant.label,
                representative=variant.representative,
                **variant.overrides,
            )
        except RuntimeError as error:
            if variant.group in ("default", "check"):
                raise
            reason = str(error).strip().splitlines()[0]
            rows.append({"group": variant.group, "variant": variant.label, "skipped": reason})
            print(f"ablation {variant.group}={variant.label} skipped: {reason}")
            continue
        seconds = time.perf_counter() - start
        curves[f"{variant.group}: {variant.label}"] = points
        default = default or points
        # compare_curves puts the default in s2o's place: its ratios are variant / default.
        summary = summarise_ratios(compare_curves(default, {variant.label: points}), floor)[0]
        at_default = next(p for p in points if p.value == DEFAULT_THRESHOLD)
        rows.append(
            {
                "group": variant.group,
                "variant": variant.label,
                "density@default": at_default.density,
                "mse@default": at_default.mse,
                "rel_l2@default": at_default.rel_l2,
                "mse_gain_at_matched_density": 1 / summary["mse_ratio_geomean"],
                "density_gain_at_matched_error": 1 / summary["density_ratio_geomean"],
                "seconds": seconds,
            }
        )
    return curves, rows


def check_ablations(curves: dict[str, list[baselines.CurvePoint]]) -> list[str]:
    """The Python scoring path with the plain mean must reproduce the op's ranking: same density
    (within 0.5%) and MSE (within 5%) at every threshold."""
    failures = []
    default = curves.get("default: default")
    check = next((v for k, v in curves.items() if k.startswith("check")), None)
    if default is None or check is None:
        return ["ablations: default or check curve missing"]
    for a, b in zip(default, check, strict=True):
        if abs(a.density - b.density) > 0.005 * a.density or abs(a.mse - b.mse) > 0.05 * a.mse:
            failures.append(
                f"ablation check at threshold {a.value}: op density {a.density:.4f} "
                f"mse {a.mse:.3e}, Python scores {b.density:.4f} {b.mse:.3e}"
            )
    return failures
