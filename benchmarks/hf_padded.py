"""A Hugging Face padded batch end to end: is its prefill sparse, equal to each sequence alone,
and how fast against SDPA?

A Llama-architecture model with random weights (the Llama-3.1-8B attention shape: Hq 32, Hkv 8,
D 128; ``--layers`` decoder layers, 2 by default) runs one prefill of a batch of random prompts of
different lengths, padded on the ``--side`` with an attention mask, as ``generate`` would:

- ``s2o``: ``attn_implementation="s2o"``; every prefill attention call must take the sparse path
  (the batch is unpadded into one varlen call per layer); a dense call is an error;
- ``alone``: the same model on each sequence unpadded, one forward each: the reference;
- ``sdpa``: ``attn_implementation="sdpa"`` on the padded batch (its masked kernel).

Reported: median ms of the forward (CUDA events after warm-up; wall clock on the CPU), and the
relative L2 difference of the final hidden states of the real positions from ``alone`` (all rows,
and the worst sequence). Random weights give nearly uniform attention, so s2o runs at about full
density here: the row checks the path and its equality, it does not measure a speedup.

    python -m benchmarks.hf_padded                                   # 4 x 16K-32K, left padding
    python -m benchmarks.hf_padded --lengths 32768 20480 --side right
    python -m benchmarks.hf_padded --device cpu --tiny --lengths 300 170 --config min_keys=0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import s2o
from benchmarks.common import (
    markdown_table,
    median_ms,
    parse_config_overrides,
    print_run_header,
    write_json,
)
from s2o.integrations import transformers as s2o_hf

DEFAULT_LENGTHS = [32768, 28672, 20480, 16384]
# The Llama-3.1-8B attention shape, a small vocabulary (the logits are not the question).
LLAMA_SHAPE = dict(
    hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, vocab_size=32000, max_position_embeddings=131072, rope_theta=500000.0,
)  # fmt: skip
TINY_SHAPE = dict(
    hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, vocab_size=512, max_position_embeddings=4096,
)  # fmt: skip


def padded_prompts(lengths: list[int], vocab: int, side: str, device, seed: int = 0):
    """Random prompts of ``lengths`` padded to the longest on ``side``: ``(input_ids,
    attention_mask)`` [B, N] and the real positions per row (a list of index ranges)."""
    generator = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    ids = torch.zeros(len(lengths), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    real = []
    for b, n in enumerate(lengths):
        span = range(longest - n, longest) if side == "left" else range(n)
        ids[b, span.start : span.stop] = torch.randint(1, vocab, (n,), generator=generator)
        mask[b, span.start : span.stop] = 1
        real.append(span)
    return ids.to(device), mask.to(device), real


def models(args, device, dtype):
    """The model under "s2o" and "sdpa", same random weights."""
    shape = TINY_SHAPE if args.tiny else LLAMA_SHAPE
    config = LlamaConfig(num_hidden_layers=args.layers, **shape)
    with torch.device(device):
        first = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="s2o")
    second = AutoModelForCausalLM.from_config(
        LlamaConfig(num_hidden_layers=args.layers, **shape), dtype=dtype,
        attn_implementation="sdpa",
    )  # fmt: skip
    second.load_state_dict(first.state_dict())
    return first.eval(), second.to(device).eval()


def hidden_states(model, ids, mask=None) -> torch.Tensor:
    """The final hidden states ``[B, N, hidden]`` of one prefill."""
    with torch.inference_mode():
        return model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    s2o_model, sdpa_model = models(args, device, dtype)
    ids, mask, real = padded_prompts(args.lengths, s2o_model.config.vocab_size, args.side, device)

    with s2o_hf.record_stats() as recorder:
        batch = hidden_states(s2o_model, ids, mask)
    dense = recorder.dense_reasons()
    if dense:
        raise SystemExit(f"s2o's padded prefill took the dense path: {dense}")
    alone = [hidden_states(s2o_model, ids[b : b + 1, span.start : span.stop])[0]
             for b, span in enumerate(real)]  # fmt: skip
    squared = norms = worst = 0.0
    for b, span in enumerate(real):
        diff = (batch[b, span.start : span.stop].float() - alone[b].float()).square().sum()
        norm = alone[b].float().square().sum()
        squared, norms = squared + float(diff), norms + float(norm)
        worst = max(worst, float((diff / norm).sqrt()))
    sdpa_batch = hidden_states(sdpa_model, ids, mask)
    sdpa_diff = max(
        float(
            (sdpa_batch[b, s.start : s.stop].float() - alone[b].float()).norm()
            / alone[b].float().norm()
        )
        for b, s in enumerate(real)
    )
    del batch, alone, sdpa_batch

    runs = {
        "s2o": lambda: hidden_states(s2o_model, ids, mask),
        "alone": lambda: [hidden_states(s2o_model, ids[b : b + 1, s.start : s.stop])
                          for b, s in enumerate(real)],
        "sdpa": lambda: hidden_states(sdpa_model, ids, mask),
    }  # fmt: skip
    rows = []
    for name, fn in runs.items():
        ms = median_ms(fn, (), warmup=args.warmup, repeats=args.repeats, device=device)
        row = dict(method=name, ms=ms)
        if name == "s2o":
            row.update(rel_diff_vs_alone=(squared / norms) ** 0.5, worst_seq_vs_alone=worst,
                       sparse_calls=len(recorder.sparse_calls))  # fmt: skip
        if name == "sdpa":
            row.update(worst_seq_vs_alone=sdpa_diff)
        rows.append(row)
        print(row, flush=True)
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS)
    parser.add_argument("--side", choices=["left", "right"], default="left")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="a tiny model (CPU runs, tests)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", default="", help="S2OConfig overrides, e.g. min_keys=0")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/hf_padded"))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    header = print_run_header(args.device, lengths=" ".join(map(str, args.lengths)))
    previous = s2o_hf.set_config(s2o.S2OConfig(**parse_config_overrides(args.config)))
    try:
        rows = run(args)
    finally:
        s2o_hf.set_config(previous)
    write_json(args.out / "hf_padded.json", {"header": header, "rows": rows})
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
