"""Bad input gets an error that names the argument, never a crash or a silent wrong result."""

import pytest
import torch

import s2o
from s2o import S2OConfig

B, HQ, HKV, N, D = 1, 4, 2, 100, 32
LAYOUT = dict(segment_size=32, q_offset=0, is_causal=True)


def _qkv(**overrides):
    shapes = dict(q=(B, HQ, N, D), k=(B, HKV, N, D), v=(B, HKV, N, D))
    tensors = {name: torch.randn(shape) for name, shape in shapes.items()}
    tensors.update(overrides)
    return tensors["q"], tensors["k"], tensors["v"]


def _indices(q, k, order_per_kv_head=True, **layout):
    layout = {**LAYOUT, **layout}
    _, scores = s2o.estimate_importance(q, k, order_per_kv_head=order_per_kv_head, **layout)
    return s2o.permute_indices(scores, num_queries=q.shape[2], num_keys=k.shape[2], **layout)


def _attend(q, k, v, indices=None, **kwargs):
    args = {**LAYOUT, "block_m": 16, "block_n": 16, "threshold": 0.01, **kwargs}
    if indices is None:
        indices = _indices(q, k, **{n: args[n] for n in LAYOUT})
    return s2o.sparse_attention(q, k, v, indices, **args)


def _estimate(q, k, **kwargs):
    return s2o.estimate_importance(q, k, **{**LAYOUT, **kwargs})


TENSOR_CASES = {
    "query rank": (dict(q=torch.randn(HQ, N, D)), "query must have shape"),
    "key rank": (dict(k=torch.randn(B, HKV, N, D, 1)), "key must have shape"),
    "value rank": (dict(v=torch.randn(HKV, N, D)), "value must have shape"),
    "batch": (dict(k=torch.randn(2, HKV, N, D), v=torch.randn(2, HKV, N, D)), "batch size"),
    "head dim": (dict(k=torch.randn(B, HKV, N, 16), v=torch.randn(B, HKV, N, 16)), "head dim"),
    "value length": (dict(v=torch.randn(B, HKV, N + 1, D)), "value shape"),
    "value heads": (dict(v=torch.randn(B, HQ, N, D)), "value shape"),
    "head multiple": (
        dict(k=torch.randn(B, 3, N, D), v=torch.randn(B, 3, N, D)),
        "multiple of key heads",
    ),
    "query int": (dict(q=torch.ones(B, HQ, N, D, dtype=torch.int32)), "query must be float32"),
    "key bool": (dict(k=torch.ones(B, HKV, N, D, dtype=torch.bool)), "key must be float32"),
    "query float64": (
        dict(q=torch.randn(B, HQ, N, D, dtype=torch.float64)),
        "query must be float32",
    ),
    "mixed dtypes": (dict(k=torch.randn(B, HKV, N, D).bfloat16()), "key dtype"),
    "value dtype": (dict(v=torch.randn(B, HKV, N, D).half()), "value dtype"),
    "head dim too large": (
        dict(
            q=torch.randn(B, HQ, 8, 512),
            k=torch.randn(B, HKV, 8, 512),
            v=torch.randn(B, HKV, 8, 512),
        ),
        "head dim must be",
    ),
    "no query rows": (dict(q=torch.randn(B, HQ, 0, D)), "at least one row"),
    "no keys": (dict(k=torch.randn(B, HKV, 0, D), v=torch.randn(B, HKV, 0, D)), "at least one row"),
}


@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_bad_tensors(case):
    overrides, message = TENSOR_CASES[case]
    q, k, v = _qkv(**overrides)
    if "value" not in case:
        with pytest.raises(RuntimeError, match=message):
            _estimate(q, k)
    good_indices = _indices(*_qkv()[:2])
    with pytest.raises(RuntimeError, match=message):
        _attend(q, k, v, indices=good_indices)


KNOB_CASES = {
    "segment_size zero": (dict(segment_size=0), "segment_size must be positive"),
    "segment_size negative": (dict(segment_size=-32), "segment_size must be positive"),
    "block_m zero": (dict(block_m=0), "block_m must be positive"),
    "block_n negative": (dict(block_n=-1), "block_n must be positive"),
    "block_m not dividing segment": (dict(block_m=24), "multiple of block_m"),
    "negative threshold": (dict(threshold=-0.1), "threshold must be finite and >= 0"),
    "nan threshold": (dict(threshold=float("nan")), "threshold must be finite and >= 0"),
    "patience zero": (dict(patience=0), "patience must be >= 1"),
    "negative tail_threshold": (dict(tail_threshold=-0.1), "tail_threshold must be finite"),
    "inf tail_threshold": (dict(tail_threshold=float("inf")), "tail_threshold must be finite"),
    "scale inf": (dict(scale=float("inf")), "scale must be finite"),
}


@pytest.mark.parametrize("case", list(KNOB_CASES))
def test_bad_knobs(case):
    kwargs, message = KNOB_CASES[case]
    q, k, v = _qkv()
    indices = _indices(q, k)
    with pytest.raises(RuntimeError, match=message):
        _attend(q, k, v, indices=indices, **kwargs)


@pytest.mark.parametrize("q_offset", [-1, 5])
def test_bad_q_offset(q_offset):
    # Nq == Nk: only q_offset 0 is valid; Nq < Nk allows up to Nk - Nq (bottom-right).
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="q_offset must be in"):
        _estimate(q, k, q_offset=q_offset)
    with pytest.raises(RuntimeError, match="q_offset must be in"):
        s2o.permute_indices(
            torch.zeros(1, 2, 0), num_queries=N, num_keys=N, segment_size=32, q_offset=q_offset
        )
    with pytest.raises(RuntimeError, match="q_offset must be in"):
        _attend(q, k, v, indices=_indices(q, k), q_offset=q_offset)
    q_short = torch.randn(B, HQ, N - 10, D)
    _estimate(q_short, k, q_offset=10)  # valid: bottom-right
    with pytest.raises(RuntimeError, match=r"q_offset must be in \[0, 10\]"):
        _estimate(q_short, k, q_offset=11)


@pytest.mark.parametrize("weight", [-0.5, float("nan"), float("inf")])
def test_bad_variance_weight(weight):
    q, k, _ = _qkv()
    with pytest.raises(RuntimeError, match="variance_weight must be finite and >= 0"):
        _estimate(q, k, variance_weight=weight)


def test_bad_indices():
    q, k, v = _qkv()
    indices = _indices(q, k)
    with pytest.raises(RuntimeError, match="indices must be int32"):
        _attend(q, k, v, indices=indices.long())
    with pytest.raises(RuntimeError, match="indices must have shape"):
        _attend(q, k, v, indices=indices[..., 1:])
    with pytest.raises(RuntimeError, match="indices must have shape"):
        _attend(q, k, v, indices=indices, order_per_kv_head=False)  # per-KV-head indices

    bad = indices.clone()
    bad[0, 0, -1] = 10_000
    with pytest.raises(RuntimeError, match="outside its segment's history"):
        _attend(q, k, v, indices=bad, threshold=0.0)


def test_group_units_need_per_kv_head_ordering():
    q, k, v = _qkv()
    indices = _indices(q, k, order_per_kv_head=False)
    with pytest.raises(RuntimeError, match="group_units needs order_per_kv_head"):
        _attend(q, k, v, indices=indices, order_per_kv_head=False, group_units=True)


def test_bad_permute_arguments():
    q, k, _ = _qkv()
    _, scores = _estimate(q, k)
    kwargs = dict(num_queries=N, num_keys=N, **LAYOUT)
    with pytest.raises(RuntimeError, match="rank_bits must be in"):
        s2o.permute_indices(scores, rank_bits=0, **kwargs)
    with pytest.raises(RuntimeError, match="rank_bits must be in"):
        s2o.permute_indices(scores, rank_bits=33, **kwargs)
    with pytest.raises(RuntimeError, match="scores must be a float32"):
        s2o.permute_indices(scores.double(), **kwargs)
    with pytest.raises(RuntimeError, match="scores must have shape"):
        s2o.permute_indices(scores[..., :-1], **kwargs)
    with pytest.raises(RuntimeError, match="num_keys must be >= 1"):
        s2o.permute_indices(scores, **{**kwargs, "num_keys": 0})


@pytest.mark.cuda
def test_tensors_on_different_devices():
    d = 64  # a head dim the CUDA kernels take
    q, k, v = (torch.randn(B, h, N, d) for h in (HQ, HKV, HKV))
    with pytest.raises(RuntimeError, match="same device"):
        _estimate(q.cuda().bfloat16(), k.bfloat16())
    q, k, v = (t.cuda().bfloat16() for t in (q, k, v))
    indices = _indices(q, k)
    with pytest.raises(RuntimeError, match="same device"):
        _attend(q, k, v.cpu(), indices=indices)
    with pytest.raises(RuntimeError, match="same device"):
        _attend(q, k, v, indices=indices.cpu())


CONFIG_CASES = {
    "ordering": (dict(ordering="token"), "ordering must be"),
    "alignment": (dict(causal_alignment="left"), "causal_alignment must be"),
    "segment_size": (dict(segment_size=0), "segment_size must be >= 1"),
    "block_m": (dict(block_m=48), "block_m must be positive and divide"),
    "threshold": (dict(threshold=-1.0), "threshold must be finite"),
    "rank_bits": (dict(rank_bits=40), "rank_bits must be in"),
    "rank_head": (dict(rank_head=-1), "rank_head must be None or >= 0"),
    "score_variance": (dict(score_variance=-0.5), "score_variance must be finite"),
    "patience": (dict(patience=0), "patience must be >= 1"),
    "tail_threshold": (dict(tail_threshold=float("nan")), "tail_threshold must be finite"),
    "group_units": (dict(ordering="query_head", group_units=True), "group_units needs"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config(case):
    kwargs, message = CONFIG_CASES[case]
    with pytest.raises(ValueError, match=message):
        S2OConfig(**kwargs)


def test_rank_head_follows_the_threshold():
    # block_n x (max(64, 1 / threshold) tiles rounded up to a power of two); 0 ranks everything.
    expected = {0.0: 0, 0.1: 4096, 0.03: 4096, 0.01: 8192, 0.004: 16384, 0.001: 65536}
    for threshold, rank_head in expected.items():
        assert S2OConfig(threshold=threshold).resolve_rank_head() == rank_head
    assert S2OConfig(threshold=0.004, block_n=32).resolve_rank_head() == 8192
    assert S2OConfig(threshold=0.1, rank_head=0).resolve_rank_head() == 0
    assert S2OConfig(rank_head=1000).resolve_rank_head() == 1000
