"""End to end on a trained model: SmolLM2-135M-Instruct (s2o.models) on real text (s2o.texts),
dense SDPA against s2o in every attention layer of the same model object (s2o.patch_llama).

Tasks (``--tasks``, all by default):

- ``lm``: next-token prediction at every position of each text at each length: perplexity of
  the dense and the s2o forward, their relative difference, the mean KL(dense || s2o) per token
  of the next-token distributions, top-1 agreement (share of positions whose argmax agrees), and
  what the s2o forward's attention calls did (path per call, layers on the sparse path, mean
  density; s2o.integrations.transformers.record_stats).
- ``copy``: induction. Text, then 256 random ordinary tokens (seeded), then the same tokens
  again; accuracy = share of positions of the second copy whose greedy next token (one
  teacher-forced forward) is the true next token of the copy.
- ``recall``: key -> value in a haystack. Needles "The secret word of the <4 random words> is
  <word>." at paragraph breaks spread over the text (words absent from it); the haystack is
  prefilled into a KV cache, and each trial, on its own, appends "The secret word of the <4
  words> is" and the value (teacher-forced). Exact: the greedy prediction of the value is
  right; choice: the right value has the highest logit among the needles' values.
  ``--recall-seeds`` haystacks of ``--needles`` needles per length.
- ``long``: beyond the trained context (8192 tokens), RoPE scaled linearly by length / 8192:
  at each ``--long-lengths`` one dense and one s2o forward of the copy input, lm metrics over
  its text part and copy accuracy over its second copy. 16K by default (about 8 minutes on 2
  CPU cores); ``--long-lengths 16384 32768`` adds 32K (attention grows with the square: expect
  about four times as long).

copy, recall and long use the first text of ``--texts`` (prose by default) or ``--text-file``.

    python -m benchmarks.model_e2e                            # 2K, 4K, 8K; 16K beyond
    python -m benchmarks.model_e2e --tasks long --long-lengths 16384 32768
    python -m benchmarks.model_e2e --text-file my.txt --lengths 4096 --config threshold=0.005

s2o runs with ``S2OConfig(min_keys=0)`` (the package default sends sequences under 16K keys to
dense SDPA) plus the ``--config`` overrides. Results go to ``--out`` (default
results/model_e2e/): one CSV per task, ``summary.json`` and ``model_e2e.png``.
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import re
import time
from collections import Counter
from pathlib import Path

import torch

import s2o
from benchmarks.common import (
    REPO_ROOT,
    benchmark_config,
    benchmark_texts,
    markdown_table,
    parse_config_overrides,
    print_run_header,
    write_csv,
    write_json,
)
from s2o import models, texts
from s2o.integrations.transformers import record_stats

TASKS = ("lm", "copy", "recall", "long")
TRAINED_CONTEXT = models.SMOLLM2_TRAINED_CONTEXT
LOGIT_CHUNK = 1024  # positions per lm_head chunk (a chunk's log-probs: 200 MB in fp32)
# Tokens drawn for the tasks: among the tokenizer's first 20000 ids (its most frequent merges).
TOKEN_ID_LIMIT = 20000
_WORD_TOKEN = re.compile(r" [a-z]{3,10}")  # recall keys and values: a space and a word
_PRINTABLE = re.compile(r"[ -~]+")  # copy spans: any printable-ASCII token
# Copy: the span is shown twice, the second copy right after the first. The model copies 256
# random ordinary tokens at 0.82-0.85 densely (2K-8K); it does worse on word tokens only
# (0.55-0.68 at 2K: the prior of real words fights the copy), on 1024-token spans (0.64 at
# 8K) and with the first copy 6K tokens back (0.53).
COPY_SPAN = 256
# Recall: a key of KEY_WORDS words, a one-token value. Formats the model failed densely (8
# needles, prose haystack, 8K): "key-1234: 5678" lines (0/7 at 2K already), "<word>: <word>"
# lines, 4-digit values (first digit often wrong: 50-75%), two-word keys (50-75% at 8K); all
# questions in one forward after the haystack (at 8K the model answers with the values of the
# questions before: 1 of 8).
KEY_WORDS = 4
NEEDLE = "\nThe secret word of the {key} is {value}.\n"
QUESTION = "\nThe secret word of the {key} is"

_start = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _start:7.1f} s] {message}", flush=True)


# --------------------------------------------------------------------------------------------
# Forwards and next-token metrics


def s2o_config(overrides: dict) -> s2o.S2OConfig:
    return benchmark_config(**overrides)


@torch.no_grad()
def final_hidden(model, input_ids: torch.Tensor, cache=None, use_cache: bool = False):
    """The final (normed) hidden states [N, hidden] of one sequence, and the KV cache."""
    out = model.model(input_ids=input_ids, past_key_values=cache, use_cache=use_cache)
    return out.last_hidden_state[0], out.past_key_values


def call_summary(recorder, num_layers: int) -> dict:
    """What the attention calls of one s2o forward did."""
    paths = Counter(call.path for call in recorder.calls)
    sparse = recorder.sparse_calls
    densities = [call.stats.density for call in sparse if call.stats is not None]
    return {
        "calls_sparse": paths.get("sparse", 0),
        "calls_dense": paths.get("dense", 0),
        "dense_reasons": dict(recorder.dense_reasons()),
        "layers_sparse": len({call.layer_idx for call in sparse}),
        "all_layers_sparse": len({call.layer_idx for call in sparse}) == num_layers
        and paths.get("dense", 0) == 0,
        "density": sum(densities) / len(densities) if densities else float("nan"),
        # Heads s2o recomputed exactly (error budget), where S2OStats reports them.
        "heads_recomputed": sum(getattr(call.stats, "recomputed_heads", 0) for call in sparse),
    }


def dense_and_s2o_hidden(model, input_ids, config, label: str) -> tuple:
    """Final hidden states of a dense (sdpa) and an s2o forward of the same model, the s2o
    forward's call summary and both times (s)."""
    start = time.perf_counter()
    dense, _ = final_hidden(model, input_ids)
    t_dense = time.perf_counter() - start
    log(f"{label}: dense forward {t_dense:.1f} s")
    start = time.perf_counter()
    with s2o.patch_llama(model, config), record_stats() as recorder:
        sparse, _ = final_hidden(model, input_ids)
    t_s2o = time.perf_counter() - start
    calls = call_summary(recorder, model.config.num_hidden_layers)
    log(f"{label}: s2o forward {t_s2o:.1f} s (density {calls['density']:.3f})")
    return dense, sparse, calls, t_dense, t_s2o


@torch.no_grad()
def next_token_metrics(model, dense, sparse, rows: torch.Tensor, targets: torch.Tensor) -> dict:
    """At positions ``rows`` of the final hidden states, against ``targets`` (the true next
    tokens): NLL of each forward, mean KL(dense || s2o), top-1 agreement and the share of greedy
    predictions equal to the target (accuracy)."""
    head = model.get_output_embeddings()
    total = {"nll_dense": 0.0, "nll_s2o": 0.0, "kl": 0.0, "agree": 0, "hit_dense": 0, "hit_s2o": 0}
    for start in range(0, len(rows), LOGIT_CHUNK):
        r, t = rows[start : start + LOGIT_CHUNK], targets[start : start + LOGIT_CHUNK, None]
        log_d = head(dense[r]).float().log_softmax(-1)
        log_s = head(sparse[r]).float().log_softmax(-1)
        total["nll_dense"] -= log_d.gather(-1, t).sum().item()
        total["nll_s2o"] -= log_s.gather(-1, t).sum().item()
        total["kl"] += (log_d.exp() * (log_d - log_s)).sum().item()
        top_d, top_s = log_d.argmax(-1), log_s.argmax(-1)
        total["agree"] += (top_d == top_s).sum().item()
        total["hit_dense"] += (top_d == t[:, 0]).sum().item()
        total["hit_s2o"] += (top_s == t[:, 0]).sum().item()
    n = len(rows)
    ppl_dense, ppl_s2o = math.exp(total["nll_dense"] / n), math.exp(total["nll_s2o"] / n)
    return {
        "positions": n,
        "ppl_dense": ppl_dense,
        "ppl_s2o": ppl_s2o,
        "ppl_rel_diff": ppl_s2o / ppl_dense - 1,
        "kl": total["kl"] / n,
        "top1_agree": total["agree"] / n,
        "acc_dense": total["hit_dense"] / n,
        "acc_s2o": total["hit_s2o"] / n,
    }


# --------------------------------------------------------------------------------------------
# Inputs


def ordinary_word_ids(tokenizer) -> torch.Tensor:
    """Ids of the tokens that are a space and a lower-case word (see _WORD_TOKEN)."""
    limit = min(TOKEN_ID_LIMIT, len(tokenizer))
    return torch.tensor([i for i in range(limit) if _WORD_TOKEN.fullmatch(tokenizer.decode([i]))])


def ordinary_token_ids(tokenizer) -> torch.Tensor:
    """Ids of the non-special tokens among the first TOKEN_ID_LIMIT that decode to printable
    ASCII (words, word pieces, numbers, punctuation)."""
    special = set(tokenizer.all_special_ids)
    limit = min(TOKEN_ID_LIMIT, len(tokenizer))
    ids = [i for i in range(limit) if _PRINTABLE.fullmatch(tokenizer.decode([i]))]
    return torch.tensor([i for i in ids if i not in special])


def copy_input(tokenizer, text: str, length: int, seed: int, span: int = COPY_SPAN, *, name="text"):
    """input_ids [1, length]: the first tokens of ``text``, ``span`` random ordinary tokens
    (seeded), the same tokens again; and the positions (rows) whose next token is one of the
    second copy after its first, with those next tokens (targets)."""
    prefix = texts.text_input_ids(tokenizer, text, length - 2 * span, name=name)[0]
    pool = ordinary_token_ids(tokenizer)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + length)
    tokens = pool[torch.randint(len(pool), (span,), generator=generator)]
    ids = torch.cat([prefix, tokens, tokens])
    rows = torch.arange(length - span, length - 1)
    return ids[None], rows, ids[rows + 1]


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def recall_input(tokenizer, text: str, length: int, seed: int, needles: int):
    """The haystack ids [1, n]: the text's first tokens with ``needles`` needles at paragraph
    breaks near evenly spread depths, n such that haystack + the longest question and value
    make ``length`` tokens. Keys (KEY_WORDS words) and values (one word each) are ordinary words
    that do not occur in the haystack. And one trial per needle: question ids, value ids, depth
    (share of the haystack before the needle), key, value."""
    rng = random.Random(seed * 1_000_003 + length)
    hay = texts.text_input_ids(tokenizer, text, length, name="haystack")[0].tolist()
    present = set(re.findall(r"[a-z]+", tokenizer.decode(hay).lower()))
    words = [tokenizer.decode([int(i)]).strip() for i in ordinary_word_ids(tokenizer)]
    words = sorted({w for w in words if w not in present})
    chosen = rng.sample(words, needles * (KEY_WORDS + 1))
    keys = [" ".join(chosen[i * KEY_WORDS : (i + 1) * KEY_WORDS]) for i in range(needles)]
    values = chosen[needles * KEY_WORDS :]
    needle_ids, questions = [], []
    for key, value in zip(keys, values, strict=True):
        needle_ids.append(_encode(tokenizer, NEEDLE.format(key=key, value=value)))
        question = _encode(tokenizer, QUESTION.format(key=key))
        full = _encode(tokenizer, QUESTION.format(key=key) + " " + value)
        if full[: len(question)] != question:
            raise RuntimeError(f"question and value do not tokenize apart: {key!r} {value!r}")
        questions.append((question, full[len(question) :]))
    hay_length = length - max(len(q) + len(v) for q, v in questions) - sum(map(len, needle_ids))
    hay = hay[:hay_length]
    breaks = [i for i in range(1, hay_length) if tokenizer.decode([hay[i - 1]]).endswith("\n")]
    if len(breaks) < needles:
        breaks = list(range(1, hay_length))
    ids, last, depths = [], 0, []
    for n, needle in enumerate(needle_ids):
        target = (n + 0.25 + 0.5 * rng.random()) / needles * hay_length
        at = min((b for b in breaks if b > last), key=lambda b: abs(b - target), default=last)
        ids += hay[last:at] + needle
        depths.append(at / hay_length)
        last = at
    ids += hay[last:]
    trials = [
        {"question": q, "value_ids": v, "depth": d, "key": k, "value": value}
        for (q, v), d, k, value in zip(questions, depths, keys, values, strict=True)
    ]
    return torch.tensor([ids]), trials


@torch.no_grad()
def recall_scores(model, tokenizer, haystack, trials) -> list[dict]:
    """Prefill the haystack into a KV cache; per trial a forward of question + value on the cache
    (cut back afterwards), each trial on its own. ``exact``: the greedy prediction of every value
    token is right; ``choice``: the value's first token has the highest logit among the first
    tokens of all needles' values."""
    _, cache = final_hidden(model, haystack, use_cache=True)
    head = model.get_output_embeddings()
    candidates = torch.tensor([trial["value_ids"][0] for trial in trials])
    results = []
    for n, trial in enumerate(trials):
        question, value = trial["question"], trial["value_ids"]
        hidden, cache = final_hidden(model, torch.tensor([question + value]), cache, True)
        cache.crop(haystack.shape[1] - cache.get_seq_length())
        logits = head(hidden[len(question) - 1 : len(question) + len(value) - 1])
        prediction = logits.argmax(-1).tolist()
        results.append(
            {
                "exact": prediction == value,
                "choice": int(logits[0, candidates].argmax()) == n,
                "predicted": tokenizer.decode(prediction),
            }
        )
    return results


# --------------------------------------------------------------------------------------------
# Tasks


def compare(model, config, ids, rows, targets, label: str) -> dict:
    """Dense and s2o forwards of ``ids``; next-token metrics at ``rows``, the s2o calls, times."""
    dense, sparse, calls, t_dense, t_s2o = dense_and_s2o_hidden(model, ids, config, label)
    metrics = next_token_metrics(model, dense, sparse, rows, targets)
    return {**metrics, **calls, "t_dense_s": t_dense, "t_s2o_s": t_s2o}


def run_lm(model, tokenizer, config, named_texts, lengths) -> list[dict]:
    rows = []
    for name, text in named_texts.items():
        for length in lengths:
            ids = texts.text_input_ids(tokenizer, text, length, name=name)
            result = compare(
                model, config, ids, torch.arange(length - 1), ids[0, 1:], f"lm {name} N={length}"
            )
            rows.append({"text": name, "length": length, **result})
    return rows


def run_copy(model, tokenizer, config, name, text, lengths, seed, span) -> list[dict]:
    rows = []
    for length in lengths:
        ids, positions, targets = copy_input(tokenizer, text, length, seed, span, name=name)
        result = compare(model, config, ids, positions, targets, f"copy {name} N={length}")
        result = {k.replace("acc_", "copy_"): v for k, v in result.items()}
        rows.append({"text": name, "length": length, "span": span, **result})
    return rows


def run_recall(model, tokenizer, config, name, text, lengths, seeds, needles) -> list[dict]:
    rows = []
    for length in lengths:
        for seed in range(seeds):
            haystack, trials = recall_input(tokenizer, text, length, seed, needles)
            start = time.perf_counter()
            dense = recall_scores(model, tokenizer, haystack, trials)
            t_dense = time.perf_counter() - start
            start = time.perf_counter()
            with s2o.patch_llama(model, config), record_stats() as recorder:
                sparse = recall_scores(model, tokenizer, haystack, trials)
            t_s2o = time.perf_counter() - start
            calls = call_summary(recorder, model.config.num_hidden_layers)
            hits = [sum(r["exact"] for r in results) for results in (dense, sparse)]
            log(
                f"recall {name} N={length} seed {seed}: exact dense {hits[0]}/{len(trials)}, "
                f"s2o {hits[1]}/{len(trials)} (dense {t_dense:.1f} s, s2o {t_s2o:.1f} s)"
            )
            timing = {"t_dense_s": t_dense, "t_s2o_s": t_s2o}
            for trial, d, s in zip(trials, dense, sparse, strict=True):
                row = {
                    "text": name,
                    "length": length,
                    "seed": seed,
                    "depth": round(trial["depth"], 3),
                }
                row.update(key=trial["key"], value=trial["value"])
                row.update({f"{k}_{m}": r[k] for m, r in (("dense", d), ("s2o", s)) for k in r})
                row.update(density=calls["density"], all_layers_sparse=calls["all_layers_sparse"])
                rows.append({**row, **timing})
    return rows


RECALL_SHARES = ("exact_dense", "exact_s2o", "choice_dense", "choice_s2o", "density")


def recall_summary(trials: list[dict]) -> list[dict]:
    """Per length: accuracy of dense and s2o, exact (greedy value) and by choice among the
    needles' values, and how many trials only one of the two got right (exact)."""
    rows = []
    for length in sorted({t["length"] for t in trials}):
        at = [t for t in trials if t["length"] == length]
        share = {key: sum(t[key] for t in at) / len(at) for key in RECALL_SHARES}
        per_seed = {t["seed"]: t for t in at}.values()
        row = {"text": at[0]["text"], "length": length, "trials": len(at)}
        row.update(recall_dense=share["exact_dense"], recall_s2o=share["exact_s2o"])
        row.update(choice_dense=share["choice_dense"], choice_s2o=share["choice_s2o"])
        row["dense_only"] = sum(t["exact_dense"] and not t["exact_s2o"] for t in at)
        row["s2o_only"] = sum(t["exact_s2o"] and not t["exact_dense"] for t in at)
        row.update(
            density=share["density"], all_layers_sparse=all(t["all_layers_sparse"] for t in at)
        )
        row.update({k: sum(t[k] for t in per_seed) for k in ("t_dense_s", "t_s2o_s")})
        rows.append(row)
    return rows


def run_long(config, name, text, lengths, seed, span, dtype) -> list[dict]:
    """Beyond the trained context, the model loaded with RoPE scaled linearly: one dense and one
    s2o forward per length of the copy input (text, span, span); lm metrics over its text part,
    copy accuracy over its second copy (a forward at 16K takes minutes on 2 CPU cores)."""
    rows = []
    for length in lengths:
        factor = length / TRAINED_CONTEXT
        log(
            f"long N={length}: loading the model with linear RoPE scaling {factor:g} "
            f"(beyond the trained {TRAINED_CONTEXT}-token context)"
        )
        model, tokenizer = models.load_smollm2(dtype=dtype, rope_scaling=factor)
        ids, copy_rows, copy_targets = copy_input(tokenizer, text, length, seed, span, name=name)
        dense, sparse, calls, t_dense, t_s2o = dense_and_s2o_hidden(
            model, ids, config, f"long {name} N={length}"
        )
        text_rows = torch.arange(length - 2 * span - 1)
        lm = next_token_metrics(model, dense, sparse, text_rows, ids[0, text_rows + 1])
        copy = next_token_metrics(model, dense, sparse, copy_rows, copy_targets)
        rows.append(
            {
                "text": name,
                "length": length,
                "rope_factor": factor,
                "beyond_trained_context": True,
                **lm,
                "copy_dense": copy["acc_dense"],
                "copy_s2o": copy["acc_s2o"],
                "copy_top1_agree": copy["top1_agree"],
                "copy_kl": copy["kl"],
                **calls,
                "t_dense_s": t_dense,
                "t_s2o_s": t_s2o,
            }
        )
        del model, dense, sparse
        gc.collect()
    return rows


# --------------------------------------------------------------------------------------------
# Output

LM_COLUMNS = (
    "text length ppl_dense ppl_s2o ppl_rel_diff kl top1_agree layers_sparse "
    "calls_dense density heads_recomputed t_dense_s t_s2o_s"
).split()
COPY_COLUMNS = (
    "text length span copy_dense copy_s2o top1_agree ppl_dense ppl_s2o kl layers_sparse density "
    "t_dense_s t_s2o_s"
).split()
RECALL_COLUMNS = (
    "text length trials recall_dense recall_s2o choice_dense choice_s2o "
    "dense_only s2o_only density all_layers_sparse t_dense_s t_s2o_s"
).split()
LONG_COLUMNS = (
    "text length rope_factor positions ppl_dense ppl_s2o ppl_rel_diff kl top1_agree copy_dense "
    "copy_s2o copy_top1_agree layers_sparse density heads_recomputed t_dense_s t_s2o_s"
).split()
TITLES = {
    "lm": "Language modelling: next token at every position, dense vs s2o",
    "copy": "Copy (induction): greedy next-token accuracy on the second copy (perplexity, KL and "
    "top-1 agreement there too)",
    "recall": f"Recall: {KEY_WORDS}-word key -> one-word value in a haystack (exact: greedy "
    "value; choice: right value among the needles' values)",
    "long": f"BEYOND THE TRAINED CONTEXT ({TRAINED_CONTEXT} tokens): RoPE scaled linearly by "
    f"length / {TRAINED_CONTEXT}; one forward of text + span + span: lm over the text part "
    "(positions), copy over the second copy",
}


def plot(path: Path, lm_rows, copy_rows, recall_rows, long_rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name in dict.fromkeys(r["text"] for r in lm_rows + long_rows):
        points = [r for r in lm_rows + long_rows if r["text"] == name]
        axes[0].plot(
            [r["length"] for r in points], [r["top1_agree"] for r in points], "o-", label=name
        )
    axes[0].set_title("next-token top-1 agreement, s2o vs dense")
    axes[0].set_ylabel("share of positions")
    panels = (
        (axes[1], copy_rows + long_rows, "copy", "copy accuracy (second copy)"),
        (axes[2], recall_rows, "recall", "recall accuracy (exact)"),
    )
    for ax, points, key, title in panels:
        points = sorted(points, key=lambda r: r["length"])
        x = [r["length"] for r in points]
        ax.plot(x, [r[f"{key}_dense"] for r in points], "o-", label="dense (sdpa)")
        ax.plot(x, [r[f"{key}_s2o"] for r in points], "s--", label="s2o")
        ax.set_title(title)
        ax.set_ylim(-0.02, 1.02)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.axvline(TRAINED_CONTEXT, color="gray", lw=0.8, ls=":")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(
        "SmolLM2-135M-Instruct, s2o in every layer against dense. Right of the dotted "
        "line: beyond the trained 8K context (RoPE scaled linearly)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument(
        "--long-lengths",
        type=int,
        nargs="+",
        default=[16384],
        help="lengths of the long task (16384: about 8 minutes on 2 CPU cores)",
    )
    parser.add_argument(
        "--texts", nargs="+", choices=texts.TEXT_KINDS, default=list(texts.TEXT_KINDS)
    )
    parser.add_argument("--text-file", help="your own text instead of --texts")
    parser.add_argument("--config", default="", help="S2OConfig overrides, e.g. threshold=0.005")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--recall-seeds", type=int, default=1, help="haystacks per length")
    parser.add_argument("--needles", type=int, default=8, help="needles (trials) per haystack")
    parser.add_argument("--copy-span", type=int, default=COPY_SPAN, help="copy: span tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "model_e2e")
    args = parser.parse_args(argv)

    config = s2o_config(parse_config_overrides(args.config))
    loaded = benchmark_texts(args.texts, args.text_file)
    named_texts = {name: text for name, (text, _) in loaded.items()}
    first = next(iter(named_texts))
    header = print_run_header(
        "cpu",
        model=f"{models.SMOLLM2_GGUF} ({models.SMOLLM2_PACKAGE} {models.SMOLLM2_VERSION})",
        s2o_config=str(config),
        texts="; ".join(f"{name}: {source}" for name, (_, source) in loaded.items()),
    )

    dtype = torch.float32
    results = {task: [] for task in TASKS}
    timings = {}
    tasks = [task for task in TASKS if task in args.tasks]
    model = tokenizer = None
    if tasks != ["long"]:
        start = time.perf_counter()
        model, tokenizer = models.load_smollm2(dtype=dtype)
        timings["load"] = time.perf_counter() - start
        log(f"model loaded ({timings['load']:.1f} s)")
    text = named_texts[first]
    for task in tasks:
        start = time.perf_counter()
        if task == "lm":
            results[task] = run_lm(model, tokenizer, config, named_texts, args.lengths)
        elif task == "copy":
            results[task] = run_copy(
                model, tokenizer, config, first, text, args.lengths, args.seed, args.copy_span
            )
        elif task == "recall":
            results["recall_trials"] = run_recall(
                model, tokenizer, config, first, text, args.lengths, args.recall_seeds, args.needles
            )
            results[task] = recall_summary(results["recall_trials"])
        elif task == "long":
            model = None  # one model in memory at a time
            gc.collect()
            results[task] = run_long(
                config, first, text, args.long_lengths, args.seed, args.copy_span, dtype
            )
        timings[task] = time.perf_counter() - start
        log(f"task {task} done ({timings[task]:.1f} s)")
        save(args.out, header, config, results, timings)  # after every task: partial results

    columns = {
        "lm": LM_COLUMNS,
        "copy": COPY_COLUMNS,
        "recall": RECALL_COLUMNS,
        "long": LONG_COLUMNS,
    }
    for task in TASKS:
        if results[task]:
            print(f"\n## {TITLES[task]}\n")
            print(markdown_table(results[task], columns[task]))
    total = time.perf_counter() - _start
    print(
        f"\ntimes (s): {', '.join(f'{k} {v:.0f}' for k, v in timings.items())}, total {total:.0f}"
    )
    plot(args.out / "model_e2e.png", *(results[t] for t in TASKS))
    print(f"results in {args.out}")


def save(out: Path, header, config, results, timings) -> None:
    for name, rows in results.items():
        if rows:
            write_csv(out / f"{name}.csv", rows)
    summary = {"header": header, "config": vars(config), "results": results, "timings_s": timings}
    write_json(out / "summary.json", summary)


if __name__ == "__main__":
    main()
