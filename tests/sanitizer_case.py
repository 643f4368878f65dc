"""A small run of every CUDA kernel variant, for compute-sanitizer (not collected by pytest):

    compute-sanitizer --tool memcheck python -m tests.sanitizer_case
    compute-sanitizer --tool racecheck python -m tests.sanitizer_case

Exits non-zero if a CUDA result differs from the CPU kernels'.
"""

import os

import torch

from .conftest import MODES, Case, make_qkv, run_pipeline, runs_wgmma_kernel

# Each case runs in every unit mode whose units fit the CUDA kernel (at most 128 rows).
CASES = [
    Case(1, 4, 4, 150, 150, 64, 64, 16, 64),  # 16-row units -> 64-row blocks
    Case(1, 8, 2, 140, 170, 128, 128, 128, 64, q_offset=30),  # 128-row units, bottom-right
    Case(1, 8, 2, 140, 170, 128, 64, 32, 64),  # grouped: 4 heads x 32 rows -> 128-row blocks
    Case(1, 4, 2, 100, 90, 128, 32, 32, 64, is_causal=False),
]


def main() -> None:
    torch.manual_seed(0)
    # Both sparse attention kernels where the GPU runs them (the wgmma one needs Hopper).
    kernels = ["sm80"] + (["sm90"] if runs_wgmma_kernel() else [])
    for kernel in kernels:
        os.environ["S2O_ATTENTION_KERNEL"] = kernel
        for case in CASES:
            for order_per_kv_head, group_units in MODES.values():
                group = case.q_heads // case.kv_heads
                if group_units and group * case.block_m > 128:
                    continue
                modes = dict(order_per_kv_head=order_per_kv_head, group_units=group_units)
                check(case, modes)
    print(f"sanitizer case: all kernel variants ({', '.join(kernels)}) ran and agree with the CPU")


def check(case: Case, modes: dict) -> None:
    # 12 rank bits: the counting sort of permute_indices (ranking the whole history, or a prefix of
    # 40 keys and the rest in index order); 32: its radix sort.
    for dtype, rank_bits, ranked_keys in (
        (torch.bfloat16, 12, 0),
        (torch.bfloat16, 12, 40),
        (torch.float16, 32, 0),
    ):
        q, k, v = make_qkv(case, dtype, contiguous=False, peaky=True)
        kwargs = dict(threshold=0.02, rank_bits=rank_bits, ranked_keys=ranked_keys, **modes)
        _, indices, (out, _, counts) = run_pipeline(case, q, k, v, **kwargs)
        qc, kc, vc = (t.cuda() for t in (q, k, v))
        _, indices_c, (out_c, _, counts_c) = run_pipeline(case, qc, kc, vc, **kwargs)
        torch.cuda.synchronize()
        assert torch.equal(indices_c.cpu(), indices), (case, modes)
        assert (counts_c.cpu() == counts).float().mean() > 0.9, (case, modes)
        assert (out_c.cpu().float() - out.float()).abs().max() < 0.1, (case, modes)


if __name__ == "__main__":
    main()
