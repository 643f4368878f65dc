"""End-to-end prefill time (time to first token) of Llama-3.1-8B: SDPA flash, SDPA cuDNN and s2o.

Question: how much faster is a whole prefill with s2o attention, and how much of it is attention?

The model is the Llama-3.1-8B architecture (its published config, below) with random weights in
bf16, or a real checkpoint with ``--model PATH``; prompts are random token ids. For each prompt
length it times one prefill forward (``use_cache=True``, ``logits_to_keep=1``) plus the next-token
argmax, with CUDA events, median of ``--repeats`` runs after ``--warmup`` runs, under each backend:

- ``flash``: SDPA with ``sdpa_kernel(SDPBackend.FLASH_ATTENTION)`` (FlashAttention-2),
- ``cudnn``: SDPA with ``sdpa_kernel(SDPBackend.CUDNN_ATTENTION)``,
- ``s2o``: ``s2o.integrations.transformers.s2o_attention_forward`` (a fallback is an error).

K/V keep their 8 heads (``enable_gqa=True``); a dense backend that rejects that gets repeated K/V
instead, noted in the ``kv`` column. The attention calls are timed inside the model by wrapping
the registered attention function with events, giving the attention share of the prefill.

Random weights give nearly uniform attention, where early stopping has nothing to skip, so the
s2o row also reports two clearly labelled numbers:

- ``ttft_ms``: measured end to end on this model (random weights: s2o at about full density);
- ``proj_ms``: projected = measured ttft - measured attention time + (s2o attention time measured
  on the package's structured data, ``s2o.data.structured_qkv`` at the model's head shape) x layers.

Before timing, the last-token logits of every backend are compared with flash (s2o at threshold 0),
and s2o at threshold 0 with dense SDPA on the structured data.

Memory: 8B in bf16 is 16 GB; a 128K prefill adds the KV cache (16 GB) and transient activations
(the MLP's 128K x 14336 intermediates, a few GB each); with ``logits_to_keep=1`` the logits are one
row, so 128K fits an H200's 141 GB. The ``peak_gb`` column reports it.

Usage:
    python -m benchmarks.e2e_prefill --out results/e2e_prefill          # 32K, 64K, 128K on a GPU
    python -m benchmarks.e2e_prefill --lengths 131072 --repeats 3       # one length per call
    python -m benchmarks.e2e_prefill --model /path/to/Llama-3.1-8B      # a real checkpoint
    python -m benchmarks.e2e_prefill --dry-run                          # tiny model on CPU

One 128K forward takes tens of seconds per backend: split the lengths over several calls when
each call has a time limit.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import inspect
import json
import platform
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig
from transformers.masking_utils import AttentionMaskInterface

import s2o
from benchmarks.common import (
    Interval,
    add_threshold_argument,
    benchmark_config,
    git_revision,
    median_ms,
)
from s2o import S2OConfig
from s2o.data import structured_qkv
from s2o.integrations import transformers as s2o_hf

# Llama-3.1-8B's published config.json (meta-llama/Llama-3.1-8B), and the same architecture scaled
# down for --tiny (CPU check of the script): the sizes and token ids as (Llama-3.1-8B, tiny), then
# what both share.
SIZES = {
    "hidden_size": (4096, 256),
    "intermediate_size": (14336, 512),
    "num_hidden_layers": (32, 2),
    "num_attention_heads": (32, 8),
    "num_key_value_heads": (8, 2),
    "head_dim": (128, 32),
    "vocab_size": (128256, 1000),
    "bos_token_id": (128000, 1),
    "eos_token_id": (128001, 2),
}
ARCHITECTURE = dict(
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_parameters=dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
    tie_word_embeddings=False,
)
LLAMA_3_1_8B = {**ARCHITECTURE, **{key: full for key, (full, _) in SIZES.items()}}
TINY = {**ARCHITECTURE, **{key: tiny for key, (_, tiny) in SIZES.items()}}
LENGTHS = (32768, 65536, 131072)
TINY_LENGTHS = (512, 1024)
CHECK_LENGTH = 8192  # prompt length of the correctness check
TINY_CHECK_LENGTH = 256
# Relative L2 error allowed before timing: last-token logits of a backend vs flash (bf16 through
# all layers), and s2o's attention output at threshold 0 vs dense SDPA (one bf16 rounding). The
# logits of the random-weight model drift through 32 bf16 layers: SDPA cuDNN vs SDPA flash
# differ by 5.2% at 16K (H200), so the bound sits at twice that floor; a wrong route or kernel
# gives errors of order 1.
LOGITS_TOLERANCE = 0.1
ATTENTION_TOLERANCE = 0.02
IMPLEMENTATION = "s2o_bench"


# ---------------------------------------------------------------------------------------------
# Timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Backends


def dense_prefill_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, repeat_kv=False, **kwargs
):
    """Causal SDPA for an unpadded one-shot prefill; what transformers' sdpa does there.
    query ``[B, Hq, N, D]``, key/value ``[B, Hkv, N, D]``; returns ``([B, N, Hq, D], None)``."""
    if attention_mask is not None or query.shape[2] != key.shape[2]:
        raise RuntimeError("the benchmark runs unpadded one-shot prefills only")
    group = query.shape[1] // key.shape[1]
    if repeat_kv and group > 1:
        key = key.repeat_interleave(group, dim=1)
        value = value.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=scaling, enable_gqa=key.shape[1] != query.shape[1]
    )
    return out.transpose(1, 2).contiguous(), None


@dataclasses.dataclass
class Backend:
    name: str
    sdpa_backend: SDPBackend | None  # None: s2o
    repeat_kv: bool = False  # set when the SDPA backend rejects K/V with fewer heads

    def context(self):
        if self.sdpa_backend is None:
            return contextlib.nullcontext()
        return sdpa_kernel(self.sdpa_backend)

    def attention(self, module, *args, **kwargs):
        if self.sdpa_backend is None:
            return s2o_hf.s2o_attention_forward(module, *args, **kwargs)
        return dense_prefill_attention(module, *args, repeat_kv=self.repeat_kv, **kwargs)


class BenchAttention:
    """The attention function registered as ``s2o_bench``: the current backend's, and while
    ``timing`` is on, each call timed."""

    def __init__(self, device: torch.device):
        self.device = device
        self.backend: Backend | None = None
        self.timing = False
        self.intervals: list[Interval] = []

    def __call__(self, module, *args, **kwargs):
        if not self.timing:
            return self.backend.attention(module, *args, **kwargs)
        interval = Interval(self.device)
        interval.start()
        out = self.backend.attention(module, *args, **kwargs)
        interval.stop()
        self.intervals.append(interval)
        return out

    def take_ms(self) -> float:
        """Total milliseconds of the calls timed since the last take."""
        total = sum(interval.ms() for interval in self.intervals)
        self.intervals = []
        return total


def make_backends(names: list[str], device: torch.device) -> list[Backend]:
    available = {
        "flash": Backend("flash", SDPBackend.FLASH_ATTENTION),
        "cudnn": Backend("cudnn", SDPBackend.CUDNN_ATTENTION),
        "s2o": Backend("s2o", None),
    }
    backends = []
    for name in names:
        if name == "cudnn" and device.type != "cuda":
            print("skipping cudnn: SDPA's cuDNN backend needs CUDA")
            continue
        backends.append(available[name])
    return backends


# ---------------------------------------------------------------------------------------------
# Model and runs


def head_shape(config) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) of a transformers config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_attention_heads, config.num_key_value_heads, head_dim


def model_shaped_qkv(length: int, model_config, device: torch.device, dtype: torch.dtype):
    """``s2o.data.structured_qkv`` of ``length`` tokens at the model's head shape."""
    q_heads, kv_heads, head_dim = head_shape(model_config)
    return structured_qkv(
        length, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, device=device
    )


def load_model(args, device: torch.device, dtype: torch.dtype):
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(
            args.model, dtype=dtype, attn_implementation=IMPLEMENTATION
        )
        return model.to(device).eval()
    config = LlamaConfig(**(TINY if args.tiny else LLAMA_3_1_8B))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=IMPLEMENTATION
        )
    return model.eval()


def prefill_kwargs(model) -> dict:
    parameters = inspect.signature(model.forward).parameters
    kwargs = {"use_cache": True}
    if "logits_to_keep" in parameters:
        kwargs["logits_to_keep"] = 1
    return kwargs


def prefill(model, input_ids, kwargs) -> torch.Tensor:
    """One prefill; returns the last position's logits ``[B, vocab]`` (the first token's)."""
    with torch.inference_mode():
        return model(input_ids=input_ids, **kwargs).logits[:, -1]


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.float() - expected.float()).norm() / expected.float().norm()).item()


def random_prompt(model, length: int, device: torch.device, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (1, length), generator=generator).to(device)


def run_backend(model, bench, backend, input_ids, kwargs):
    """Last-token logits of one prefill under a backend; a dense backend that rejects GQA is
    retried once with repeated K/V."""
    bench.backend = backend
    try:
        with backend.context():
            return prefill(model, input_ids, kwargs)
    except RuntimeError as error:
        if backend.sdpa_backend is None or backend.repeat_kv:
            raise
        print(f"{backend.name}: {str(error).splitlines()[0]} -> retrying with repeated K/V")
        backend.repeat_kv = True
        with backend.context():
            return prefill(model, input_ids, kwargs)


def check_correctness(model, bench, backends, config, args, device, dtype) -> dict:
    """Logits of every backend vs flash (s2o at threshold 0), and s2o's attention at threshold 0
    vs dense SDPA on structured data. Raises when an error exceeds its tolerance."""
    kwargs = prefill_kwargs(model)
    input_ids = random_prompt(model, args.check_length, device, seed=1)
    exact = dataclasses.replace(config, threshold=0.0, strict=True)
    s2o_hf.set_config(exact)
    reference_backend = next((b for b in backends if b.sdpa_backend is not None), None)
    errors = {}
    if reference_backend is not None:
        expected = run_backend(model, bench, reference_backend, input_ids, kwargs)
        for backend in backends:
            if backend is not reference_backend:
                logits = run_backend(model, bench, backend, input_ids, kwargs)
                errors[f"logits {backend.name} vs {reference_backend.name}"] = relative_error(
                    logits, expected
                )
    q, k, v = model_shaped_qkv(args.check_length, model.config, device, dtype)
    with torch.inference_mode():
        out = s2o.attention(q, k, v, is_causal=True, enable_gqa=True, config=exact)
        dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    errors["structured attention s2o(threshold 0) vs sdpa"] = relative_error(out, dense)
    s2o_hf.set_config(config)
    for name, error in errors.items():
        tolerance = LOGITS_TOLERANCE if name.startswith("logits") else ATTENTION_TOLERANCE
        print(f"check {name}: relative L2 error {error:.2e} (tolerance {tolerance:.0e})")
        if not error <= tolerance:
            raise SystemExit(f"correctness check failed: {name}: {error:.3e} > {tolerance:.0e}")
    return errors


def time_structured_attention(length, model_config, config, args, device, dtype) -> dict:
    """s2o.attention on structured data at the model's head shape: median ms per call, density,
    relative L2 error vs dense SDPA."""
    q, k, v = model_shaped_qkv(length, model_config, device, dtype)
    with torch.inference_mode():
        out, stats = s2o.attention(
            q, k, v, is_causal=True, enable_gqa=True, config=config, return_stats=True
        )
        dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        error = relative_error(out, dense)
        del out, dense
        call = functools.partial(s2o.attention, is_causal=True, enable_gqa=True, config=config)
        ms = median_ms(call, (q, k, v), warmup=args.warmup, repeats=args.repeats, device=device)
    return dict(ms=ms, density=stats.density, rel_error=error)


def time_prefill(model, bench, backend, input_ids, args, device) -> dict:
    """Median prefill ms and attention ms of one backend, and the peak memory."""
    kwargs = prefill_kwargs(model)
    run_backend(model, bench, backend, input_ids, kwargs)  # first run; may switch to repeat_kv
    for _ in range(max(0, args.warmup - 1)):
        run_backend(model, bench, backend, input_ids, kwargs)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    totals, attention = [], []
    with backend.context():
        for _ in range(args.repeats):
            _sync(device)
            total = Interval(device)
            bench.timing = True
            total.start()
            next_token = prefill(model, input_ids, kwargs).argmax(-1)
            total.stop()
            bench.timing = False
            totals.append(total.ms())
            attention.append(bench.take_ms())
            del next_token
    peak_gb = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return dict(
        ttft_ms=statistics.median(totals),
        attn_ms=statistics.median(attention),
        peak_gb=peak_gb,
        kv="repeated" if backend.repeat_kv else "native",
    )


def model_density(model, bench, backend, input_ids) -> float | None:
    """s2o's density over the model's attention calls in one (untimed) prefill."""
    bench.backend = backend
    with s2o_hf.record_stats() as recorder:
        prefill(model, input_ids, prefill_kwargs(model))
    if recorder.dense_calls:
        reasons = dict(recorder.dense_reasons())
        raise SystemExit(f"{backend.name}: attention calls fell back to dense SDPA: {reasons}")
    return recorder.density()


# ---------------------------------------------------------------------------------------------
# Report


def machine_header(device: torch.device) -> dict:
    on_gpu = device.type == "cuda"
    header = dict(
        device=torch.cuda.get_device_name(device) if on_gpu else platform.processor(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if on_gpu else None,
        transformers=transformers.__version__,
        s2o=s2o.__version__,
        git=git_revision(),
    )
    if not on_gpu:
        header["device"] = header["device"] or platform.machine()
        header["cpu_threads"] = torch.get_num_threads()
    return header


COLUMNS = [
    ("length", "length", "{}"),
    ("backend", "backend", "{}"),
    ("kv", "kv", "{}"),
    ("ttft_ms", "measured ttft ms", "{:.1f}"),
    ("attn_ms", "attn ms", "{:.1f}"),
    ("attn_share", "attn %", "{:.0%}"),
    ("attn_ms_per_layer", "attn ms/layer", "{:.2f}"),
    ("model_density", "density (model)", "{:.3f}"),
    ("structured_ms_per_layer", "s2o ms/layer (structured)", "{:.2f}"),
    ("structured_density", "density (structured)", "{:.3f}"),
    ("structured_rel_error", "rel err (structured)", "{:.3f}"),
    ("proj_ms", "projected ttft ms", "{:.1f}"),
    ("speedup_vs_flash", "x flash (meas/proj)", "{}"),
    ("speedup_vs_cudnn", "x cudnn (meas/proj)", "{}"),
    ("peak_gb", "peak GB", "{:.1f}"),
]


def add_speedups(rows: list[dict]) -> None:
    """Speedup of each row's ttft (measured / projected) over the dense rows of its length."""
    for row in rows:
        for dense in ("flash", "cudnn"):
            reference = next(
                (r for r in rows if r["length"] == row["length"] and r["backend"] == dense), None
            )
            if reference is None or row["backend"] == dense:
                row[f"speedup_vs_{dense}"] = None
                continue
            measured = reference["ttft_ms"] / row["ttft_ms"]
            text = f"{measured:.2f}"
            if row.get("proj_ms") is not None:
                text += f" / {reference['ttft_ms'] / row['proj_ms']:.2f}"
            row[f"speedup_vs_{dense}"] = text


def format_table(rows: list[dict]) -> str:
    def cell(row, key, fmt):
        value = row.get(key)
        return "-" if value is None else fmt.format(value)

    header = [title for _, title, _ in COLUMNS]
    body = [[cell(row, key, fmt) for key, _, fmt in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(map(str.rjust, line, widths)) for line in [header, *body]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def write_results(out_dir: Path, header: dict, settings: dict, checks: dict, rows: list[dict]):
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "e2e_prefill.json", "w") as file:
        json.dump(dict(machine=header, settings=settings, checks=checks, rows=rows), file, indent=2)
    with open(out_dir / "e2e_prefill.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=[key for key, _, _ in COLUMNS])
        writer.writeheader()
        writer.writerows([{key: row.get(key) for key, _, _ in COLUMNS} for row in rows])
    print(f"wrote {out_dir / 'e2e_prefill.csv'} and {out_dir / 'e2e_prefill.json'}")


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", help=f"prompt lengths (GPU: {LENGTHS})")
    parser.add_argument("--backends", nargs="+", default=["flash", "cudnn", "s2o"])
    parser.add_argument("--model", help="a transformers checkpoint instead of random weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama (to check the script)")
    parser.add_argument("--dry-run", action="store_true", help="--tiny on the CPU, 2 repeats")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    add_threshold_argument(parser)
    parser.add_argument("--check-length", type=int, help="prompt length of the correctness check")
    parser.add_argument("--out", type=Path, help="directory for e2e_prefill.csv / .json")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.tiny, args.repeats = "cpu", True, 2
    if args.lengths is None:
        args.lengths = list(TINY_LENGTHS if args.tiny else LENGTHS)
    if args.check_length is None:
        args.check_length = TINY_CHECK_LENGTH if args.tiny else CHECK_LENGTH
    if args.repeats < 1 or args.warmup < 1:
        parser.error("--repeats and --warmup must be >= 1")
    return args


def s2o_config(args) -> S2OConfig:
    # Not strict (heads over the error budget are recomputed as in a user's call); model_density
    # checks that no call fell back to dense SDPA.
    tiny = dict(min_keys=1, segment_size=64) if args.tiny else {}
    return benchmark_config(args.threshold, **tiny)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), torch.bfloat16
    header = machine_header(device)
    print("  ".join(f"{key}: {value}" for key, value in header.items()))

    bench = BenchAttention(device)
    AttentionInterface.register(IMPLEMENTATION, bench)
    AttentionMaskInterface.register(IMPLEMENTATION, s2o_hf.s2o_mask)
    config = s2o_config(args)
    s2o_hf.set_config(config)
    backends = make_backends(args.backends, device)
    model = load_model(args, device, dtype)
    num_layers = model.config.num_hidden_layers
    settings = dict(
        model=args.model or ("tiny Llama (random)" if args.tiny else "Llama-3.1-8B (random)"),
        dtype=str(dtype),
        head_shape=head_shape(model.config),
        layers=num_layers,
        repeats=args.repeats,
        warmup=args.warmup,
        s2o_config=dataclasses.asdict(s2o_hf.get_config()),
        prefill_kwargs=prefill_kwargs(model),
    )
    print("  ".join(f"{key}: {value}" for key, value in settings.items()))

    checks = check_correctness(model, bench, backends, config, args, device, dtype)
    rows = []
    for length in args.lengths:
        input_ids = random_prompt(model, length, device, seed=0)
        structured = None
        if any(b.sdpa_backend is None for b in backends):
            structured = time_structured_attention(
                length, model.config, config, args, device, dtype
            )
        for backend in backends:
            timing = time_prefill(model, bench, backend, input_ids, args, device)
            row = dict(length=length, backend=backend.name, **timing)
            row["attn_share"] = row["attn_ms"] / row["ttft_ms"]
            row["attn_ms_per_layer"] = row["attn_ms"] / num_layers
            if backend.sdpa_backend is None:
                row["model_density"] = model_density(model, bench, backend, input_ids)
                row["structured_ms_per_layer"] = structured["ms"]
                row["structured_density"] = structured["density"]
                row["structured_rel_error"] = structured["rel_error"]
                row["proj_ms"] = row["ttft_ms"] - row["attn_ms"] + structured["ms"] * num_layers
            rows.append(row)
            print(
                f"length {length} {backend.name}: ttft {row['ttft_ms']:.1f} ms, "
                f"attention {row['attn_ms']:.1f} ms"
            )
        del input_ids
        if device.type == "cuda":
            torch.cuda.empty_cache()
    add_speedups(rows)

    print()
    clock = "CUDA events" if device.type == "cuda" else "wall clock"
    print(f"measured ttft: one prefill forward + argmax, median of {args.repeats} runs ({clock}).")
    print(
        "projected ttft (s2o): measured ttft - measured attention"
        f" + s2o attention on structured data x {num_layers} layers."
    )
    print(format_table(rows))
    if args.out:
        write_results(args.out, header, settings, checks, rows)
    return rows


if __name__ == "__main__":
    main()
