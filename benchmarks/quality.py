"""Quality benchmark: error vs density of s2o against block-sparse baselines on the same inputs.

For each length: the inputs' attention statistics; every baseline of benchmarks/baselines.py swept
over its knob; s2o swept over ``S2OConfig.threshold`` (the tail threshold in proportion:
benchmarks.common.at_threshold); the s2o error ratio at matched density and
density ratio at matched error against each baseline, the best non-oracle baseline at each point
and the oracle; CSV/JSON tables and PNG plots; then ablations of s2o's knobs on one length; then
self-checks (monotone curves, files written), exiting non-zero when one fails.

Commands (from the repository root):

    python benchmarks/quality.py --smoke                   # CPU: 4K (16 heads), 8K (8 heads)
    python benchmarks/quality.py --device cuda --lengths 32768 65536 131072 \\
        --ablation-length 32768 --s2o-variants ordering=kv_head
    python benchmarks/quality.py --device cuda --model PATH --text-file FILE --layers 0 15 31 \\
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

# Runnable as ``python benchmarks/quality.py`` as well as ``python -m benchmarks.quality``.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import s2o  # noqa: E402
from benchmarks import baselines  # noqa: E402
from benchmarks.common import (  # noqa: E402
    REPO_ROOT,
    at_threshold,
    markdown_table,
    parse_config_overrides,
    print_header,
    run_header,
    write_csv,
    write_json,
)
from s2o import data  # noqa: E402
from s2o.layout import SegmentLayout  # noqa: E402
from s2o.plan import Plan, softmax_scale  # noqa: E402

THRESHOLDS = (0.0, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3)
ABLATION_THRESHOLDS = (0.003, 0.01, 0.03, 0.1)
# --smoke: CPU preset that runs in about 2.5 minutes on 2 idle cores. KV groups 0, 1, 4, 6 of the
# default 32-head shape hold every head type (streaming, retrieval, slash, diffuse), as do 0, 4.
SMOKE_RUNS = ((4096, [0, 1, 4, 6]), (8192, [0, 4]))
SMOKE_THRESHOLDS = (0.0, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3)
SMOKE_ABLATION = (4096, [0, 4])
DEFAULT_THRESHOLD = s2o.S2OConfig().threshold
# s2o points within this factor of the rounding floor are left out of ratio summaries.
FLOOR_FACTOR = 4.0
ORACLE = "oracle"
NOT_BASELINES = ("dense", ORACLE)
# Baselines of our own making (PBS with s2o's per-query-segment importance), not published
# methods: "best-published" leaves them out, "best" does not.
UNPUBLISHED_PREFIXES = ("pbs-qseg",)


# --------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Inputs:
    """Q/K/V of one benchmark case: query [B, Hq, N, D], key/value [B, Hkv, N, D]; head_kinds
    labels each query head (head type, or layer for captured inputs)."""

    name: str
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scale: float | None
    head_kinds: list[str]

    @property
    def length(self) -> int:
        return self.query.shape[2]


def structured_inputs(
    length: int,
    *,
    q_heads: int = 32,
    kv_heads: int = 8,
    head_dim: int = 128,
    kv_groups: list[int] | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> Inputs:
    """s2o.data.structured_qkv in bf16, optionally only the KV groups ``kv_groups`` (with their
    query heads): the head types of the full shape are kept."""
    q, k, v = data.structured_qkv(
        length, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, seed=seed, device=device
    )
    kinds = [p.kind for p in data.head_profiles(q_heads, seed)]
    if kv_groups is not None:
        group = q_heads // kv_heads
        heads = [g * group + i for g in kv_groups for i in range(group)]
        q, k, v = q[:, heads], k[:, kv_groups], v[:, kv_groups]
        kinds = [kinds[h] for h in heads]
    name = f"structured N={length} Hq={q.shape[1]} Hkv={k.shape[1]} D={head_dim} seed={seed}"
    return Inputs(name, q.contiguous(), k.contiguous(), v.contiguous(), None, kinds)


def captured_inputs(
    model: str, text_file: str, length: int, layers: list[int], device: str, block: int
) -> Inputs:
    """Q/K/V of ``layers`` of a local Hugging Face causal LM for the text (repeated or cut to
    ``length`` tokens, rounded down to a multiple of ``block``); the layers are stacked as more
    heads (each layer keeps its GQA groups)."""
    from s2o.capture import load_and_capture

    length = length // block * block
    text = Path(text_file).read_text()
    captured = load_and_capture(model, text, length, layers, device=device, store_device=device)
    parts = [captured[layer] for layer in sorted(captured)]
    scales = {c.scale for c in parts}
    if len(scales) > 1:
        raise ValueError(f"captured layers use different softmax scales {scales}")
    q = torch.cat([c.query for c in parts], dim=1)
    k = torch.cat([c.key for c in parts], dim=1)
    v = torch.cat([c.value for c in parts], dim=1)
    kinds = [f"layer{c.layer}" for c in parts for _ in range(c.query.shape[1])]
    name = f"{Path(model).name} layers={sorted(captured)} N={length}"
    return Inputs(name, q.contiguous(), k.contiguous(), v.contiguous(), scales.pop(), kinds)


def mass_stats(inputs: Inputs) -> list[dict]:
    """Share of softmax mass in the top 1/3/10% of keys (last 64 rows), mean per head kind."""
    shares = data.attention_mass_stats(inputs.query, inputs.key).cpu()  # [Hq, 3]
    rows = []
    for kind in sorted(set(inputs.head_kinds)):
        heads = [h for h, k in enumerate(inputs.head_kinds) if k == kind]
        mean = shares[heads].mean(dim=0).tolist()
        rows.append(
            {
                "heads": kind,
                "count": len(heads),
                "top1%": mean[0],
                "top3%": mean[1],
                "top10%": mean[2],
            }
        )
    mean = shares.mean(dim=0).tolist()
    rows.append(
        {
            "heads": "all",
            "count": len(inputs.head_kinds),
            "top1%": mean[0],
            "top3%": mean[1],
            "top10%": mean[2],
        }
    )
    return rows


# --------------------------------------------------------------------------------------------
# s2o curves


def _squared_error_per_head(out: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Sum of squared errors per (batch, head), flattened batch-major: [B * Hq] fp64 (head by head
    to bound memory)."""
    batch, heads = out.shape[:2]
    squared = torch.empty(batch, heads, dtype=torch.float64)
    for h in range(heads):
        diff = out[:, h].float() - reference[:, h]
        squared[:, h] = diff.square().sum(dim=(1, 2)).double().cpu()
    return squared.flatten()


def _s2o_point(name, threshold, out, reference, reference_sq, tile_counts, tiles_per_head):
    """A curve point from s2o's output and tile_counts [B, H_ord, query tiles] (tiles_per_head:
    dense tiles of one ordering head)."""
    squared = _squared_error_per_head(out, reference)
    numel_per_head = out.shape[2] * out.shape[3]
    batch, ordering_heads = tile_counts.shape[:2]
    per_head = tile_counts.sum(dim=-1).double().cpu() / tiles_per_head  # [B, H_ord]
    per_head = per_head.repeat_interleave(out.shape[1] // ordering_heads, dim=1).flatten()
    total = float(squared.sum())
    return baselines.CurvePoint(
        method=name,
        knob="threshold",
        value=float(threshold),
        density=float(tile_counts.sum()) / (tiles_per_head * batch * ordering_heads),
        mse=total / (numel_per_head * squared.numel()),
        rel_l2=math.sqrt(total / reference_sq),
        head_mse=(squared / numel_per_head).tolist(),
        head_density=per_head.tolist(),
    )


def benchmark_config(**overrides) -> s2o.S2OConfig:
    """The default S2OConfig with overrides; never falls back to dense SDPA silently. Without an
    error budget unless one is given: the curves are those of the sparse pass itself (with a
    budget, strict mode would raise for a head over it)."""
    return s2o.S2OConfig(**{"min_keys": 0, "strict": True, "error_budget": None, **overrides})


def s2o_curve(
    inputs: Inputs,
    reference: torch.Tensor,
    thresholds,
    *,
    name: str = "s2o",
    representative: str | None = None,
    **config_overrides,
) -> list[baselines.CurvePoint]:
    """s2o's points for each threshold. Without ``representative``: ``s2o.attention`` (density
    from its stats); with one: keys scored in Python by alternative_scores, then the ranking and
    attention ops on those scores."""
    reference_sq = float(reference.double().square().sum())
    points = []
    for threshold in thresholds:
        config = benchmark_config(**{**at_threshold(threshold), **config_overrides})
        if representative is None:
            out, stats = s2o.attention(
                inputs.query,
                inputs.key,
                inputs.value,
                is_causal=True,
                scale=inputs.scale,
                enable_gqa=True,
                config=config,
                return_stats=True,
            )
            tile_counts = stats.tile_counts
            tiles_per_head = stats.dense_tiles / (tile_counts.shape[0] * tile_counts.shape[1])
        else:
            out, tile_counts, tiles_per_head = attention_with_representative(
                inputs, config, representative
            )
        points.append(
            _s2o_point(name, threshold, out, reference, reference_sq, tile_counts, tiles_per_head)
        )
    return points


def alternative_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    config: s2o.S2OConfig,
    representative: str,
    scale: float,
    sub_segments: int = 4,
) -> torch.Tensor:
    """History-key scores of each segment with several representatives per ordering head,
    combined so that a key important to any of them ranks high: each representative's scores
    (times the softmax scale) minus their log-sum-exp over the history (the key's estimated log
    share of that representative's mass), then the max over representatives. A single
    representative's scores are the plain dot products, as the op computes them.

    ``representative``: ``mean`` (one plain mean: the op's ranking), ``head-max`` (the mean of
    each query head of the ordering unit), ``sub-mean-max`` (``sub_segments`` means of
    consecutive rows per query head). With ``config.score_variance`` > 0 each representative's
    scores add the op's variance term over its own rows. Returns scores [B, H_ord, T] fp32 in
    the layout of ``s2o.estimate_importance``.
    """
    batch, q_heads, num_tokens, dim = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    per_kv = config.order_per_kv_head
    layout = SegmentLayout(num_tokens, num_tokens, config.segment_size, 0, True)
    heads_per_unit = group if per_kv else 1
    ordering_heads = q_heads // heads_per_unit
    keys = key.float() if per_kv else key.float().repeat_interleave(group, dim=1)
    variance_weight = config.score_variance * scale
    scores = torch.empty(batch, ordering_heads, layout.total_history, device=query.device)
    for s in range(layout.num_segments):
        history = layout.history_length(s)
        if history == 0:
            continue
        rows = query[:, :, layout.segment_rows(s)].float()  # [B, Hq, R, D]
        rows = rows.reshape(batch, ordering_heads, heads_per_unit, rows.shape[2], dim)
        # Each representative's rows: parts of [B, H_ord, representatives, rows, D].
        if representative == "mean":
            parts = [rows.flatten(2, 3)[:, :, None]]
        elif representative == "head-max":
            parts = [rows]
        elif representative == "sub-mean-max":
            parts = torch.tensor_split(rows, min(sub_segments, rows.shape[3]), dim=3)
        else:
            raise ValueError(f"unknown representative {representative!r}")
        reps = torch.cat([p.mean(dim=3) for p in parts], dim=2)  # [B, H_ord, reps, D]
        history_keys = keys[:, :, :history]
        logits = torch.matmul(reps, history_keys.transpose(-1, -2))
        if variance_weight > 0:
            spreads = torch.cat([p.var(dim=3, unbiased=False) for p in parts], dim=2)
            logits += variance_weight * torch.matmul(
                spreads, history_keys.square().transpose(-1, -2)
            )
        # logits: [B, H_ord, representatives, history]
        if reps.shape[2] > 1:
            logits = logits * scale
            logits = (logits - logits.logsumexp(dim=-1, keepdim=True)).amax(dim=2)
        else:  # unscaled like the op's, so that rank_bits < 32 cuts the same bits
            logits = logits[:, :, 0]
        offset = layout.history_offset(s)
        scores[:, :, offset : offset + history] = logits
    return scores


def attention_with_representative(
    inputs: Inputs, config: s2o.S2OConfig, representative: str
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """s2o with Python-computed scores: (out [B, Hq, N, D], tile_counts [B, H_ord, query tiles],
    dense tiles of one ordering head)."""
    q, k, v = inputs.query, inputs.key, inputs.value
    plan = Plan.for_call(config, q.shape, k.shape, is_causal=True, scale=inputs.scale)
    scale = softmax_scale(q.shape[-1], inputs.scale)
    indices = plan.permute(alternative_scores(q, k, config, representative, scale))
    out, _, tile_counts = plan.attend(q, k, v, indices)
    return out, tile_counts, plan.dense_tiles()


# --------------------------------------------------------------------------------------------
# Matching curves


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


_BOUND_SIGNS = {"sparser": ">=", "denser": "<=", "lower": ">=", "higher": "<=", "in": ""}


def _geomean(values: list[float]) -> float:
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
            error_ratio = f"{_BOUND_SIGNS[default['error_match']]}{default[f'{metric}_ratio']:.3g}"
            density_ratio = (
                f"{_BOUND_SIGNS[default['density_match']]}{default['density_ratio']:.3g}"
            )
        summary.append(
            {
                "baseline": name,
                f"{metric}_ratio@default": error_ratio,
                "density_ratio@default": density_ratio,
                f"{metric}_ratio_geomean": _geomean(
                    [r[f"{metric}_ratio"] for r in mine if r["error_match"] == "in"]
                ),
                "density_ratio_geomean": _geomean(
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


# --------------------------------------------------------------------------------------------
# Ablations


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


# --------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_S2O_VARIANT_COLORS = ("darkred", "darkorange", "magenta", "saddlebrown")


def _style(name: str, s2o_index: int = 0) -> dict:
    if name == "s2o":
        return {"color": "tab:red", "linewidth": 2.5, "marker": "o", "zorder": 5}
    if name.startswith("s2o"):
        color = _S2O_VARIANT_COLORS[s2o_index % len(_S2O_VARIANT_COLORS)]
        return {"color": color, "linewidth": 2, "linestyle": "--", "marker": "o", "zorder": 4}
    if name == ORACLE:
        return {"color": "black", "linestyle": "--", "marker": "x"}
    if name.startswith("pbs"):
        return {"marker": "s", "markersize": 4}
    return {"marker": ".", "linewidth": 1}


def plot_curves(curves: dict[str, list[baselines.CurvePoint]], path: Path, title: str) -> None:
    """Error (MSE and relative L2) vs density on log axes, one curve per method (points in knob
    order)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    variants = [name for name in curves if name.startswith("s2o[")]
    for ax, metric in zip(axes, ("mse", "rel_l2"), strict=True):
        for name, points in curves.items():
            if name == "dense":
                continue
            points = [p for p in points if getattr(p, metric) > 0]
            style = _style(name, variants.index(name) if name in variants else 0)
            ax.plot(
                [p.density for p in points],
                [getattr(p, metric) for p in points],
                label=name,
                **style,
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("density (tiles computed / dense causal tiles)")
        ax.set_ylabel({"mse": "MSE vs fp32 dense", "rel_l2": "relative L2 error"}[metric])
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ablations(curves: dict[str, list[baselines.CurvePoint]], path: Path, title: str) -> None:
    """One panel per ablation group: its variants and the default, MSE vs density."""
    plt = _pyplot()
    groups = list(dict.fromkeys(key.split(":")[0] for key in curves if key != "default: default"))
    cols = 4
    rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    default = curves["default: default"]
    for ax, group in zip(axes.flat, groups, strict=False):
        ax.plot([p.density for p in default], [p.mse for p in default], "k-o", label="default")
        for key, points in curves.items():
            if key.split(":")[0] == group:
                ax.plot(
                    [p.density for p in points],
                    [p.mse for p in points],
                    marker=".",
                    label=key.split(": ", 1)[1],
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(group, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    fig.supxlabel("density")
    fig.supylabel("MSE")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _pool(matrix: torch.Tensor, pixels: int) -> torch.Tensor:
    """Mean-pools a square [L, L] matrix to at most pixels x pixels."""
    factor = max(1, matrix.shape[0] // pixels)
    size = matrix.shape[0] // factor * factor
    pooled = matrix[:size, :size].reshape(size // factor, factor, size // factor, factor)
    return pooled.mean(dim=(1, 3))


def plot_attention_map(
    inputs: Inputs, head: int, length: int, config: s2o.S2OConfig, path: Path
) -> dict:
    """One query head's attention over the first ``length`` tokens: (a) in original key order;
    (b) in s2o's order (per segment the ranked history, then the local keys), with the history
    tiles s2o visited left of the line; (c) the attention mass s2o skipped, in original order.
    Returns the share of the head's attention mass that s2o skipped."""
    plt = _pyplot()
    q_heads, kv_heads = inputs.query.shape[1], inputs.key.shape[1]
    group = q_heads // kv_heads
    kv_head = head // group
    per_kv = config.order_per_kv_head
    unit_heads = list(range(kv_head * group, (kv_head + 1) * group)) if per_kv else [head]
    q = inputs.query[:1, unit_heads, :length]
    k = inputs.key[:1, kv_head : kv_head + 1, :length]
    v = inputs.value[:1, kv_head : kv_head + 1, :length]
    plan = Plan.for_call(config, q.shape, k.shape, is_causal=True, scale=inputs.scale)
    block_m, segment = plan.block_m, plan.layout.segment_size
    _, indices, (_, _, counts) = plan.run(q, k, v)
    local_head = unit_heads.index(head) if per_kv else 0
    scale = softmax_scale(q.shape[-1], inputs.scale)
    logits = (q[0, local_head].float() @ k[0, 0].float().T * scale).cpu()
    pos = torch.arange(length)
    logits.masked_fill_(pos[None, :] > pos[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # [L, L]
    layout = plan.layout
    indices, counts = indices[0, 0].cpu().long(), counts[0, 0].cpu()  # one ordering head
    permuted = torch.zeros_like(probs)
    visited = torch.zeros_like(probs, dtype=torch.bool)
    stops = []  # (row, history keys visited) per query tile
    for s in range(layout.num_segments):
        rows = layout.segment_rows(s)
        start, history = layout.segment_start(s), layout.history_length(s)
        ranked = indices[layout.history_offset(s) : layout.history_offset(s) + history]
        order = torch.cat([ranked, torch.arange(start, length)])
        permuted[rows.start : rows.stop] = probs[rows.start : rows.stop][:, order]
        for t in range(rows.start // block_m, -(-rows.stop // block_m)):
            r0, r1 = t * block_m, min((t + 1) * block_m, length)
            local_tiles = -(-(r1 - start) // config.block_n)
            keys = min(history, (int(counts[t]) - local_tiles) * config.block_n)
            visited[r0:r1, ranked[:keys]] = True
            visited[r0:r1, start:r1] = True
            stops.append((r0, r1, keys))
    skipped = probs * ~visited
    skipped_share = float(skipped.sum() / probs.sum())
    pixels = 512
    factor = max(1, length // pixels)
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.6), layout="constrained")
    floor = 1e-7
    panels = (
        (probs, "attention, original key order"),
        (permuted, "s2o order: ranked history | local keys; red: where s2o stopped"),
        (skipped, f"mass skipped by s2o ({100 * skipped_share:.2f}% of all)"),
    )
    for ax, (matrix, label) in zip(axes, panels, strict=True):
        image = _pool(matrix, pixels).clamp_min(floor).log10()
        shown = ax.imshow(image.numpy(), cmap="magma", vmin=math.log10(floor), vmax=0)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel(f"key ({factor} per pixel)")
        ax.set_ylabel(f"query ({factor} per pixel)")
    for r0, r1, keys in stops:
        axes[1].plot(
            [keys / factor, keys / factor], [r0 / factor, r1 / factor], color="red", linewidth=0.8
        )
    axes[1].set_xlim(-0.5, image.shape[1] - 0.5)
    axes[1].set_ylim(image.shape[0] - 0.5, -0.5)
    fig.colorbar(shown, ax=list(axes), shrink=0.8, label="log10 attention (mean per pixel)")
    kind = inputs.head_kinds[head]
    fig.suptitle(
        f"{inputs.name}: head {head} ({kind}), first {length} tokens, threshold "
        f"{config.threshold}, segment {segment}, tiles {block_m}x{config.block_n}",
        fontsize=9,
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"head": head, "kind": kind, "skipped_mass_share": skipped_share}


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
    header = run_header(args.device)
    print_header(header)
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
                inputs, head, map_length, benchmark_config(), path
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
