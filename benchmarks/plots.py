"""The quality benchmark's plots: error-vs-density curves, the ablations, and one head's
attention map in original and in s2o's order."""

from __future__ import annotations

import math
from pathlib import Path

import torch

import s2o
from benchmarks import baselines
from benchmarks.inputs import Inputs
from benchmarks.matching import ORACLE
from s2o.plan import Plan, softmax_scale


def pyplot():
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
    plt = pyplot()
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
    plt = pyplot()
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
    plt = pyplot()
    q_heads, kv_heads = inputs.query.shape[1], inputs.key.shape[1]
    group = q_heads // kv_heads
    kv_head = head // group
    order_per_kv_head = config.order_per_kv_head
    unit_heads = (
        list(range(kv_head * group, (kv_head + 1) * group)) if order_per_kv_head else [head]
    )
    q = inputs.query[:1, unit_heads, :length]
    k = inputs.key[:1, kv_head : kv_head + 1, :length]
    v = inputs.value[:1, kv_head : kv_head + 1, :length]
    plan = Plan.for_call(config, q.shape, k.shape, is_causal=True, scale=inputs.scale)
    block_m, segment = plan.block_m, plan.layout.segment_size
    _, indices, (_, _, counts) = plan.run(q, k, v)
    local_head = unit_heads.index(head) if order_per_kv_head else 0
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
