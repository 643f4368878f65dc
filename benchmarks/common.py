"""Helpers shared by the benchmarks: the config they run, the dense reference, the timer, the run
header, result files and the texts."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO_ROOT = Path(__file__).resolve().parent.parent


def at_threshold(threshold: float) -> dict:
    """S2OConfig overrides for the operating point at ``threshold``: the tail threshold moves with
    it in the default's proportion (0 and 0: exact), so that sweeping one knob traces s2o's
    error-vs-density curve through the default."""
    from s2o import S2OConfig

    default = S2OConfig()
    if default.tail_threshold is None or default.threshold == 0:
        return {"threshold": threshold}
    return {
        "threshold": threshold,
        "tail_threshold": threshold * default.tail_threshold / default.threshold,
    }


def benchmark_config(
    threshold: float | None = None, *, sparse_pass_only: bool = False, **overrides
):
    """The S2OConfig a benchmark runs: the defaults on every length (``min_keys=0``: the package
    default sends short sequences to dense SDPA), at ``threshold`` with the tail threshold in
    proportion (at_threshold) when given, then ``overrides``.

    ``sparse_pass_only``: strict and without the error budget, so that the numbers are those of
    the sparse pass itself and a fallback raises. Otherwise not strict, so that heads over the
    budget are recomputed as in a user's call; the caller then checks that no call fell back (a
    fallback must never be measured as s2o)."""
    from s2o import S2OConfig

    strict = {"strict": True, "error_budget": None} if sparse_pass_only else {}
    operating_point = at_threshold(threshold) if threshold is not None else {}
    return S2OConfig(**{"min_keys": 0, **strict, **operating_point, **overrides})


def parse_config_overrides(spec: str) -> dict:
    """``"ordering=query_head,segment_size=128"`` -> S2OConfig overrides (int, float, None for
    ``None``, or str)."""
    overrides = {}
    for item in filter(None, spec.split(",")):
        key, value = item.split("=", 1)
        if value.strip() == "None":
            overrides[key.strip()] = None
            continue
        for convert in (int, float, str):
            try:
                overrides[key.strip()] = convert(value.strip())
                break
            except ValueError:
                continue
    return overrides


def add_threshold_argument(parser: argparse.ArgumentParser) -> None:
    """``--threshold``, for ``benchmark_config(args.threshold)`` (None when not given)."""
    parser.add_argument(
        "--threshold",
        type=float,
        help="s2o threshold, the tail threshold in proportion (default: S2OConfig's)",
    )


def _git(*args: str) -> str:
    """Output of a git command in the repository, stripped; raises when git fails."""
    git = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return git.stdout.strip()


def git_revision() -> str:
    """Short hash of HEAD, with ``+dirty`` when the working tree has changes; ``unknown`` outside
    a git checkout."""
    try:
        rev = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def run_header(device: torch.device | str) -> dict[str, str]:
    """Machine, torch, CUDA and git revision of this run (printed first, stored with results)."""
    device = torch.device(device)
    header = {
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "device": "cpu",
        "torch_threads": str(torch.get_num_threads()),
        "git": git_revision(),
    }
    if device.type == "cuda":
        header["device"] = torch.cuda.get_device_name(device)
    return header


def print_run_header(device: torch.device | str, **extra: str) -> dict[str, str]:
    """Prints the run header (run_header) with ``extra`` entries after it, one ``# key: value``
    line each, before a run's output; returns it to store with the results."""
    header = {**run_header(device), **extra}
    for key, value in header.items():
        print(f"# {key}: {value}")
    return header


def _plain(value):
    """JSON-safe value: tensors and numpy scalars to Python numbers, NaN/inf to None."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return _plain(value.item())
    return value


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_plain(payload), indent=1) + "\n")


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows of dicts; the columns are the union of their keys in first-seen order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A GitHub-markdown table of rows (floats with 4 significant digits)."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def cell(value) -> str:
        if isinstance(value, float):
            return "-" if not math.isfinite(value) else f"{value:.4g}"
        return "-" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def benchmark_texts(kinds: list[str], text_file: str | None = None) -> dict[str, tuple[str, str]]:
    """name -> (text, source) of the texts a run reads: the user's ``text_file`` as ``file``,
    else each of ``kinds`` from s2o.texts."""
    from s2o import texts

    if text_file:
        return {"file": (Path(text_file).read_text(), f"file {text_file}")}
    return {kind: (texts.load_text(kind), texts.text_source(kind)) for kind in kinds}


def dense_reference(q, k, v, scale: float | None = None) -> torch.Tensor:
    """fp32 causal attention of every row, the yardstick of the benchmarks' errors: SDPA's
    memory-efficient kernel on a GPU (no N x N buffer), its math kernel on the CPU; GQA by head
    groups. [B, Hq, N, D]."""
    group = q.shape[1] // k.shape[1]
    backend = SDPBackend.EFFICIENT_ATTENTION if q.is_cuda else SDPBackend.MATH
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(
            q.float(),
            k.float().repeat_interleave(group, dim=1),
            v.float().repeat_interleave(group, dim=1),
            is_causal=True,
            scale=scale,
        )


class Interval:
    """One timed interval: CUDA events on a GPU (no synchronisation until read), wall clock on
    the CPU."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        if self.cuda:
            self.start_event = torch.cuda.Event(enable_timing=True)
            self.end_event = torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        if self.cuda:
            self.start_event.record()
        else:
            self.start_time = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self.end_event.record()
        else:
            self.end_time = time.perf_counter()

    def ms(self) -> float:
        """Elapsed milliseconds (synchronises with the end event)."""
        if self.cuda:
            self.end_event.synchronize()
            return self.start_event.elapsed_time(self.end_event)
        return (self.end_time - self.start_time) * 1e3


def median_ms(fn, args, *, warmup: int, repeats: int, device: torch.device | str) -> float:
    """Median milliseconds of ``fn(*args)`` over ``repeats`` timed calls after ``warmup``."""
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(repeats):
        interval = Interval(device)
        interval.start()
        fn(*args)
        interval.stop()
        times.append(interval.ms())
    return statistics.median(times)
