"""Every op exists with its schema, and torch.library.opcheck passes (schema, fake kernel,
dispatcher registrations) on every device that has kernels."""

import pytest
import torch

import s2o  # noqa: F401
from s2o import reference

from .conftest import CPU_CASES, HAS_CUDA_KERNELS, make_qkv

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


def _op_args(case, device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = make_qkv(case, dtype, device=device, peaky=True)
    layout = (case.segment_size, case.q_offset, case.is_causal)
    _, scores = torch.ops.s2o.estimate_importance(q, k, *layout, True)
    indices = torch.ops.s2o.permute_indices(scores, case.num_queries, case.num_keys, *layout, 32)
    return {
        "estimate_importance": (q, k, *layout, True),
        "permute_indices": (scores, case.num_queries, case.num_keys, *layout, 32),
        "sparse_attention": (
            q,
            k,
            v,
            indices,
            *layout,
            True,
            True,
            case.block_m,
            64,
            0.02,
            1,
            None,
        ),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("name", OPS)
def test_opcheck(name, case, device):
    args = _op_args(case, device)[name]
    torch.library.opcheck(getattr(torch.ops.s2o, name).default, args)


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: c.id)
def test_opcheck_optional_arguments(case):
    """permute_indices with a ranked head, sparse_attention with a query permutation (CPU)."""
    args = _op_args(case, "cpu")
    torch.library.opcheck(torch.ops.s2o.permute_indices.default, (*args["permute_indices"], 100))
    q = args["sparse_attention"][0]
    row_order = reference.guided_row_order(q, case.segment_size)
    torch.library.opcheck(
        torch.ops.s2o.sparse_attention.default, (*args["sparse_attention"], row_order)
    )
