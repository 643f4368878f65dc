"""Every op exists with its schema, and torch.library.opcheck passes (schema, fake kernel,
dispatcher registrations) on every device that has kernels."""

import pytest
import torch

import s2o  # noqa: F401

from .conftest import CPU_CASES, HAS_CUDA_KERNELS, case_plan, make_qkv

OPS = ["estimate_importance", "permute_indices", "sparse_attention"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
# The CUDA kernels take bf16/fp16, head dim 64/128, block_n 64.
OPCHECK_CASES = [CPU_CASES[1], CPU_CASES[2]]


@pytest.mark.parametrize("name", OPS)
def test_op_registered_with_cpu_kernel(name):
    op = getattr(torch.ops.s2o, name)
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"s2o::{name}", "CPU")
    assert op.default._schema.name == f"s2o::{name}"


@pytest.mark.cuda
@pytest.mark.parametrize("name", OPS)
def test_op_registered_with_cuda_kernel(name):
    assert HAS_CUDA_KERNELS
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"s2o::{name}", "CUDA")


def _op_args(case, device, **knobs):
    """Positional arguments of each op (in schema order) for a case's plan."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = make_qkv(case, dtype, device=device, peaky=True)
    plan = case_plan(case, threshold=0.02, **knobs).replace(block_n=64)
    layout = plan.layout
    segment = tuple(plan.segment_args().values())
    scores = plan.estimate(q, k)
    indices = plan.permute(scores)
    return {
        "estimate_importance": (
            q,
            k,
            *segment,
            plan.order_per_kv_head,
            plan.score_variance,
            plan.scale,
        ),
        "permute_indices": (
            scores,
            layout.num_queries,
            layout.num_keys,
            *segment,
            plan.rank_bits,
            plan.ranked_keys,
        ),
        "sparse_attention": (q, k, v, indices, *plan.attend_args().values()),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("name", OPS)
def test_opcheck(name, case, device):
    args = _op_args(case, device)[name]
    torch.library.opcheck(getattr(torch.ops.s2o, name).default, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: c.id)
def test_opcheck_optional_arguments(case, device):
    """permute_indices with a ranked head (12 bits: the CUDA counting sort), sparse_attention
    with the tail threshold, a softmax scale and per-unit thresholds."""
    knobs = dict(rank_bits=12, ranked_keys=100, tail_threshold=0.05, scale=0.1, score_variance=0.5)
    args = _op_args(case, device, **knobs)
    for name in OPS:
        torch.library.opcheck(getattr(torch.ops.s2o, name).default, args[name])
    q = args["sparse_attention"][0]
    # (No skipped unit: its rows are left unwritten, which opcheck would compare.)
    unit_threshold = torch.full((case.batch, case.q_heads), 0.01, device=q.device)
    unit_threshold[0, 0] = 0.0
    torch.library.opcheck(
        torch.ops.s2o.sparse_attention.default, (*args["sparse_attention"], unit_threshold)
    )
