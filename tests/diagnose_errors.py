"""Raise every CUDA-side argument error once (diagnostic for the error paths; not collected)."""

import torch

import s2o

q = torch.randn(1, 4, 100, 32, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, 2, 100, 32, device="cuda", dtype=torch.bfloat16)
cases = {
    "cpu op": lambda: s2o.estimate_importance(q.cpu(), k.cpu(), segment_size=0),
    "fp32 on cuda": lambda: s2o.estimate_importance(q.float(), k.float(), segment_size=32),
    "head dim 32": lambda: s2o.estimate_importance(q, k, segment_size=32),
}
for name, fn in cases.items():
    try:
        fn()
        print(name, "did not raise")
    except RuntimeError as e:
        print(name, "raised:", str(e).splitlines()[0], flush=True)
