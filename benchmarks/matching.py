"""Matching curves: Pareto fronts, error at matched density and density at matched error, the
best baseline at each point, and their summaries (the rules are in benchmarks/quality.py's
docstring)."""

from __future__ import annotations

import math

from benchmarks import baselines
from benchmarks.inputs import Inputs
from benchmarks.s2o_curve import DEFAULT_THRESHOLD

ORACLE = "oracle"
NOT_BASELINES = ("dense", ORACLE)
# Baselines of our own making (PBS with s2o's per-query-segment importance), not published
# methods: "best-published" leaves them out, "best" does not.
UNPUBLISHED_PREFIXES = ("pbs-qseg",)
# s2o points within this factor of the rounding floor are left out of ratio summaries.
FLOOR_FACTOR = 4.0


def pareto_front(points: list[baselines.CurvePoint], metric: str = "mse"):
    """(density, error) of the points no sparser point beats: density rising, error falling."""
    front = []
    for p in sorted(points, key=lambda p: (p.density, getattr(p, metric))):
        error = getattr(p, metric)
        if error > 0 and (not front or error < front[-1][1]):
            front.append((p.density, error))
    return front


def _log_interp(x: float, x0: float, x1: float, y0: float, y1: float) -> float:
    if x1 == x0:
        return y0
    t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
    return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))


def error_at_density(front, density: float) -> tuple[float, str]:
    """The front's error at ``density`` and ``"in"``, or the nearest end's error and
    ``"sparser"`` (density below the front: the true error is at least that) or ``"denser"``
    (above: at most that)."""
    if density < front[0][0]:
        return front[0][1], "sparser"
    if density > front[-1][0]:
        return front[-1][1], "denser"
    for (d0, e0), (d1, e1) in zip(front, front[1:], strict=False):
        if d0 <= density <= d1:
            return _log_interp(density, d0, d1, e0, e1), "in"
    return front[0][1], "in"  # a single-point front at exactly this density


def density_at_error(front, error: float) -> tuple[float, str]:
    """The front's density reaching ``error`` and ``"in"``, or the nearest end's density and
    ``"lower"`` (the error is below the front's: more density needed than that) or ``"higher"``
    (reached already at the sparsest point: at most that density)."""
    if error > front[0][1]:
        return front[0][0], "higher"
    if error < front[-1][1]:
        return front[-1][0], "lower"
    for (d0, e0), (d1, e1) in zip(front, front[1:], strict=False):
        if e1 <= error <= e0:
            return _log_interp(error, e0, e1, d0, d1), "in"
    return front[0][0], "in"


def _best_of(candidates: list[dict], value_key: str, status_key: str, impossible: str):
    """The candidate with the lowest ratio among those that can operate at the point (status
    not ``impossible``), and the status of the best: ``in`` unless some candidate's value is only
    an upper bound, which makes the best an upper bound too."""
    possible = [r for r in candidates if r[status_key] != impossible] or candidates
    chosen = min(possible, key=lambda r: r[value_key])
    upper_bounds = [r for r in possible if r[status_key] not in ("in", impossible)]
    return chosen, (upper_bounds[0][status_key] if upper_bounds else chosen[status_key])


def _best_baseline(per_point: list[dict], metric: str, name: str, exclude=()) -> dict | None:
    """The pseudo-baseline ``name`` at one s2o point: per ratio, the best baseline that is not
    the oracle and whose name does not start with one of ``exclude``."""
    candidates = [
        r
        for r in per_point
        if r["baseline"] not in NOT_BASELINES and not r["baseline"].startswith(tuple(exclude))
    ]
    if not candidates:
        return None
    by_error, error_status = _best_of(candidates, f"{metric}_ratio", "error_match", "sparser")
    by_density, density_status = _best_of(candidates, "density_ratio", "density_match", "lower")
    best = dict(by_error, baseline=name, error_match=error_status)
    best.update(
        best_at_density=by_error["baseline"],
        best_at_error=by_density["baseline"],
        baseline_density_at_error=by_density["baseline_density_at_error"],
        density_ratio=by_density["density_ratio"],
        density_match=density_status,
    )
    return best


def compare_curves(
    s2o_points: list[baselines.CurvePoint],
    baseline_points: dict[str, list[baselines.CurvePoint]],
    metric: str = "mse",
) -> list[dict]:
    """Per s2o point and baseline: the baseline's error at s2o's density and density at s2o's
    error, their ratios (baseline / s2o: > 1 means s2o is better) and whether each is in range.

    Pseudo-baselines: ``best``, at each point, the non-oracle baseline with the lowest ratio
    among those that can operate there (a baseline whose sparsest point is denser than s2o's, or
    whose best error is above s2o's, cannot); the ratio is flagged as an upper bound when some
    candidate's value is one. ``best-published`` is the same without our own PBS variant
    (UNPUBLISHED_PREFIXES).
    """
    fronts = {name: pareto_front(points, metric) for name, points in baseline_points.items()}
    rows = []
    for p in s2o_points:
        s2o_error = getattr(p, metric)
        per_point = []
        for name, front in fronts.items():
            if not front:
                continue
            base_error, error_status = error_at_density(front, p.density)
            base_density, density_status = density_at_error(front, s2o_error)
            per_point.append(
                {
                    "threshold": p.value,
                    "s2o_density": p.density,
                    f"s2o_{metric}": s2o_error,
                    "baseline": name,
                    f"baseline_{metric}_at_density": base_error,
                    f"{metric}_ratio": base_error / s2o_error if s2o_error > 0 else math.inf,
                    "error_match": error_status,
                    "baseline_density_at_error": base_density,
                    "density_ratio": base_density / p.density,
                    "density_match": density_status,
                }
            )
        for best in (
            _best_baseline(per_point, metric, "best"),
            _best_baseline(per_point, metric, "best-published", UNPUBLISHED_PREFIXES),
        ):
            if best is not None:
                per_point.append(best)
        rows += per_point
    return rows


BOUND_SIGNS = {"sparser": ">=", "denser": "<=", "lower": ">=", "higher": "<=", "in": ""}


def geomean(values: list[float]) -> float:
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else math.nan


def summarise_ratios(rows: list[dict], floor: float, metric: str = "mse") -> list[dict]:
    """Per baseline: the ratios at the default threshold (with ``>=``/``<=`` when out of range)
    and their geometric means over the s2o points in range and above FLOOR_FACTOR x the rounding
    floor."""
    summary = []
    for name in dict.fromkeys(r["baseline"] for r in rows):
        mine = [
            r for r in rows if r["baseline"] == name and r[f"s2o_{metric}"] > FLOOR_FACTOR * floor
        ]
        default = next((r for r in mine if r["threshold"] == DEFAULT_THRESHOLD), None)
        error_ratio, density_ratio = "-", "-"
        if default is not None:
            error_ratio = f"{BOUND_SIGNS[default['error_match']]}{default[f'{metric}_ratio']:.3g}"
            density_ratio = f"{BOUND_SIGNS[default['density_match']]}{default['density_ratio']:.3g}"
        summary.append(
            {
                "baseline": name,
                f"{metric}_ratio@default": error_ratio,
                "density_ratio@default": density_ratio,
                f"{metric}_ratio_geomean": geomean(
                    [r[f"{metric}_ratio"] for r in mine if r["error_match"] == "in"]
                ),
                "density_ratio_geomean": geomean(
                    [r["density_ratio"] for r in mine if r["density_match"] == "in"]
                ),
                "points_in_range": sum(r["error_match"] == "in" for r in mine),
            }
        )
    return summary


def _per_head_at(points: list[baselines.CurvePoint], density: float):
    """(head_density, head_mse) of a method at a global density: log-log interpolation between
    its two points around it; None outside its range."""
    ordered = sorted(points, key=lambda p: p.density)
    lower = [p for p in ordered if p.density <= density]
    upper = [p for p in ordered if p.density >= density]
    if not lower or not upper:
        return None
    a, b = lower[-1], upper[0]
    if b.density == a.density:
        return a.head_density, a.head_mse

    def interp(xs, ys):
        return [
            _log_interp(density, a.density, b.density, max(x, 1e-30), max(y, 1e-30))
            for x, y in zip(xs, ys, strict=True)
        ]

    return interp(a.head_density, b.head_density), interp(a.head_mse, b.head_mse)


def head_kind_table(
    inputs: Inputs,
    s2o_point: baselines.CurvePoint,
    curves: dict[str, list[baselines.CurvePoint]],
    names: list[str],
) -> list[dict]:
    """Mean density and MSE per head kind of s2o at one point and of the named methods at the
    same global density (where their points bracket it): where each spends tiles and where its
    error comes from."""
    per_method = {"s2o": (s2o_point.head_density, s2o_point.head_mse)}
    for name in names:
        values = _per_head_at(curves[name], s2o_point.density)
        if values is not None:
            per_method[name] = values
    repeats = len(s2o_point.head_mse) // len(inputs.head_kinds)
    kinds = inputs.head_kinds * repeats  # batch-major flattening
    rows = []
    for kind in sorted(set(kinds)):
        heads = [i for i, k in enumerate(kinds) if k == kind]
        row = {"heads": kind, "count": len(heads)}
        for name, (density, mse) in per_method.items():
            row[f"{name} density"] = sum(density[i] for i in heads) / len(heads)
            row[f"{name} mse"] = sum(mse[i] for i in heads) / len(heads)
        rows.append(row)
    return rows
