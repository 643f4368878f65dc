"""The s2o demo: dense attention against s2o on built-in structured long-context data.

    python -m s2o.demo            # 32K on a GPU, 4K on the CPU
    python -m s2o.demo --length 8192 --threshold 0.003

Prints, per method: length, time, density (share of the dense attention's tiles computed), and
the MSE and relative L2 error of the output against fp32 dense attention. Where the trained model
of s2o.models is installed, a last row runs it on 1K tokens of real text (s2o.texts) with s2o in
every layer: density, the error estimate of the calls, and next-token top-1 agreement with the
dense model (``--no-model`` leaves it out).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import torch
import torch.nn.functional as F

import s2o
from s2o import S2OConfig, data

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3.1-8B's attention shape


def _time_ms(
    fn, device: torch.device, repeats: int, warm: bool = False
) -> tuple[torch.Tensor, float]:
    if not warm:
        fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return out, sorted(times)[len(times) // 2]


def _reference(q, k, v, rows: int) -> tuple[torch.Tensor, slice]:
    """fp32 dense attention of the last `rows` query rows (all of them on the CPU)."""
    n = q.shape[2]
    sel = slice(n - rows, n)
    if rows == n:  # SDPA's fused kernel, without the N x N logits
        ref = F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True
        )
        return ref, sel
    group = q.shape[1] // k.shape[1]
    qs = q[:, :, sel].float()
    ks = k.float().repeat_interleave(group, dim=1)
    vs = v.float().repeat_interleave(group, dim=1)
    logits = qs @ ks.transpose(-1, -2) / math.sqrt(q.shape[-1])
    pos = torch.arange(n - rows, n, device=q.device)[:, None]
    logits.masked_fill_(torch.arange(n, device=q.device)[None, :] > pos, float("-inf"))
    return torch.softmax(logits, dim=-1) @ vs, sel


def main() -> None:
    parser = argparse.ArgumentParser(description="s2o against dense attention")
    parser.add_argument("--length", type=int, default=None, help="default: 32768 GPU, 4096 CPU")
    parser.add_argument("--threshold", type=float, default=S2OConfig.threshold)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-model", action="store_true", help="skip the trained-model row")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    length = args.length or (32768 if cuda else 4096)
    dtype = torch.bfloat16
    q, k, v = data.structured_qkv(
        length, q_heads=Q_HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=dtype, device=device
    )
    # Error on the last rows, which see the longest history (all rows on the CPU).
    ref, rows = _reference(q, k, v, min(length, 4096 if cuda else length))

    def dense():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    exact = S2OConfig(threshold=0.0, min_keys=1, strict=True)
    # Not strict: strict mode would raise for a head over the error budget instead of
    # recomputing it; the stats below say that the sparse path was taken.
    default = S2OConfig(threshold=args.threshold, min_keys=1)
    repeats = 5 if cuda else 1
    print(
        f"s2o {s2o.__version__} demo on {torch.cuda.get_device_name(device) if cuda else 'CPU'}: "
        f"structured data, B=1 Hq={Q_HEADS} Hkv={KV_HEADS} D={HEAD_DIM} {str(dtype)[6:]}, causal"
    )
    print(f"{'method':<24}{'length':>8}{'time ms':>10}{'density':>9}{'MSE':>11}{'rel err':>9}")
    for name, fn, config in (
        ("dense SDPA", dense, None),
        ("s2o threshold=0", None, exact),
        (f"s2o threshold={args.threshold:g}", None, default),
    ):
        density = 1.0
        if config is not None:

            def fn(config=config):
                return s2o.attention(q, k, v, is_causal=True, enable_gqa=True, config=config)

            _, stats = s2o.attention(
                q, k, v, is_causal=True, enable_gqa=True, config=config, return_stats=True
            )
            assert stats.path == "sparse", stats.fallback_reason
            density = stats.density
        out, ms = _time_ms(fn, device, repeats, warm=config is not None)  # (the stats call)
        err = out[:, :, rows].float() - ref
        mse, rel = err.pow(2).mean().item(), (err.norm() / ref.norm()).item()
        print(f"{name:<24}{length:>8}{ms:>10.1f}{density:>9.3f}{mse:>11.2e}{rel:>9.4f}")
    if not args.no_model:
        trained_model_row(default)


MODEL_TOKENS = 1024


@torch.no_grad()
def trained_model_row(config: S2OConfig) -> None:
    """SmolLM2-135M (CPU, fp32) on MODEL_TOKENS tokens of prose: dense SDPA against s2o in every
    layer (min_keys 0, the rest as ``config``)."""
    from s2o import models, texts
    from s2o.integrations.transformers import record_stats

    missing = models.missing_packages()
    if missing:
        print(f"(trained-model row skipped: {', '.join(missing)} not installed)")
        return
    model, tokenizer = models.load_smollm2()
    ids = texts.text_input_ids(tokenizer, texts.load_text("prose"), MODEL_TOKENS)
    start = time.perf_counter()
    dense = model(input_ids=ids, use_cache=False).logits[0]
    dense_s = time.perf_counter() - start
    sparse_config = dataclasses.replace(config, min_keys=0)
    with s2o.patch_llama(model, sparse_config), record_stats() as recorder:
        start = time.perf_counter()
        sparse = model(input_ids=ids, use_cache=False).logits[0]
        sparse_s = time.perf_counter() - start
    calls = recorder.sparse_calls
    errors = [call.stats.error for call in calls]
    top1 = (dense.argmax(-1) == sparse.argmax(-1)).float().mean().item()
    print(
        f"\nSmolLM2-135M (trained, CPU fp32), {MODEL_TOKENS} tokens of prose, s2o in "
        f"{len(calls)} of {model.config.num_hidden_layers} layers: forward {sparse_s:.1f} s "
        f"(dense {dense_s:.1f} s), density {recorder.density():.3f}, estimated attention error "
        f"mean {sum(errors) / len(errors):.4f} / worst layer {max(errors):.4f}, heads recomputed "
        f"{sum(call.stats.recomputed_heads for call in calls)}, next-token top-1 agreement "
        f"{top1:.4f}"
    )


if __name__ == "__main__":
    main()
