"""Bad input gets an error that names the argument, never a crash or a silent wrong result."""

import dataclasses

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


def _estimate(q, k, **kwargs):
    return s2o.estimate_importance(
        q, k, **{**LAYOUT, "order_per_kv_head": True, "score_variance": 0.0, **kwargs}
    )


def _permute(scores, **kwargs):
    return s2o.permute_indices(scores, **{**LAYOUT, "rank_bits": 32, "ranked_keys": 0, **kwargs})


def _indices(q, k, order_per_kv_head=True, **layout):
    layout = {**LAYOUT, **layout}
    scores = _estimate(q, k, order_per_kv_head=order_per_kv_head, **layout)
    return _permute(scores, num_queries=q.shape[2], num_keys=k.shape[2], **layout)


def _attend(q, k, v, indices=None, **kwargs):
    args = {
        **LAYOUT,
        "order_per_kv_head": True,
        "group_units": False,
        "block_m": 16,
        "block_n": 16,
        "threshold": 0.01,
        "patience": 1,
        "tail_threshold": None,
        **kwargs,
    }
    if indices is None:
        indices = _indices(q, k, **{n: args[n] for n in LAYOUT})
    return s2o.sparse_attention(q, k, v, indices, **args)


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
        _permute(torch.zeros(1, 2, 0), num_queries=N, num_keys=N, q_offset=q_offset)
    with pytest.raises(RuntimeError, match="q_offset must be in"):
        _attend(q, k, v, indices=_indices(q, k), q_offset=q_offset)
    q_short = torch.randn(B, HQ, N - 10, D)
    _estimate(q_short, k, q_offset=10)  # valid: bottom-right
    with pytest.raises(RuntimeError, match=r"q_offset must be in \[0, 10\]"):
        _estimate(q_short, k, q_offset=11)


@pytest.mark.parametrize("weight", [-0.5, float("nan"), float("inf")])
def test_bad_score_variance(weight):
    q, k, _ = _qkv()
    with pytest.raises(RuntimeError, match="score_variance must be finite and >= 0"):
        _estimate(q, k, score_variance=weight)


def test_variance_term_needs_a_positive_scale():
    q, k, _ = _qkv()
    with pytest.raises(RuntimeError, match="scale must be > 0 with score_variance > 0"):
        _estimate(q, k, score_variance=0.5, scale=-0.1)
    _estimate(q, k, score_variance=0.0, scale=-0.1)  # no variance term: any scale


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
    scores = _estimate(q, k)
    kwargs = dict(num_queries=N, num_keys=N)
    with pytest.raises(RuntimeError, match="rank_bits must be in"):
        _permute(scores, rank_bits=0, **kwargs)
    with pytest.raises(RuntimeError, match="rank_bits must be in"):
        _permute(scores, rank_bits=33, **kwargs)
    with pytest.raises(RuntimeError, match="scores must be a float32"):
        _permute(scores.double(), **kwargs)
    with pytest.raises(RuntimeError, match="scores must have shape"):
        _permute(scores[..., :-1], **kwargs)
    with pytest.raises(RuntimeError, match="num_keys must be >= 1"):
        _permute(scores, num_queries=N, num_keys=0)


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


SPARSE = S2OConfig(min_keys=1, segment_size=32, strict=True)  # takes the sparse path or raises


def _sdpa_shaped(hq=HQ, hkv=HKV, dk=D, dv=D):
    return torch.randn(B, hq, N, D), torch.randn(B, hkv, N, dk), torch.randn(B, hkv, N, dv)


ATTENTION_CASES = {
    # Hq not a multiple of Hkv: SDPA raises; s2o used to drop query heads or fail on a reshape.
    "heads 4 and 3": (_sdpa_shaped(4, 3), dict(enable_gqa=True), "multiple of the key head count"),
    "heads 8 and 6": (_sdpa_shaped(8, 6), dict(enable_gqa=True), r"\(8 and 6 heads\)"),
    "heads 2 and 4": (_sdpa_shaped(2, 4), dict(enable_gqa=True), r"\(2 and 4 heads\)"),
    "key head dim": (_sdpa_shaped(dk=16), {}, "query and key must have the same head dim"),
    "dropout_p negative": (_sdpa_shaped(), dict(dropout_p=-0.1), r"dropout_p must be in \[0, 1\]"),
    "dropout_p above 1": (_sdpa_shaped(), dict(dropout_p=1.5), r"dropout_p must be in \[0, 1\]"),
    "scale nan": (_sdpa_shaped(), dict(scale=float("nan")), "scale must be finite"),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_bad_attention_arguments(case):
    (q, k, v), kwargs, message = ATTENTION_CASES[case]
    for config in (SPARSE, S2OConfig()):  # strict and not: never a silent fallback
        with pytest.raises(ValueError, match=message):
            s2o.attention(q, k, v, is_causal=True, config=config, **kwargs)


def test_config_must_be_an_s2o_config():
    with pytest.raises(TypeError, match="config must be an s2o.S2OConfig or None, got dict"):
        s2o.attention(*_sdpa_shaped(HQ, HQ), config={"threshold": 0.1})


@pytest.mark.parametrize("scale", [-0.125, -1.0])
def test_negative_scale_computes_the_softmax_of_the_scaled_logits(scale):
    q, k, v = _sdpa_shaped(HQ, HQ)
    exact = dataclasses.replace(SPARSE, threshold=0.0)
    out, stats = s2o.attention(
        q, k, v, is_causal=True, scale=scale, config=exact, return_stats=True
    )
    # With an explicit mask: CPU SDPA's is_causal path returns NaN for a negative scale.
    mask = torch.ones(N, N, dtype=torch.bool).tril()
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, scale=scale)
    assert stats.path == "sparse"
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "shapes",
    [
        ((B, 0, N, D), (B, 0, N, D)),  # no heads
        ((B, HQ, N, 0), (B, HKV, N, 0)),  # head dim 0
        ((B, HQ, 0, D), (B, HKV, N, D)),  # no query rows
        ((0, HQ, N, D), (0, HKV, N, D)),  # no batch
    ],
)
def test_empty_inputs_return_sdpa_s_empty_result(shapes):
    q_shape, kv_shape = shapes
    q, k, v = torch.randn(q_shape), torch.randn(kv_shape), torch.randn(kv_shape)
    out, stats = s2o.attention(q, k, v, is_causal=True, enable_gqa=True, config=SPARSE,
                               return_stats=True)  # fmt: skip
    # SDPA's output shape (SDPA itself is not called here: some builds divide by zero on zero
    # heads with enable_gqa).
    assert out.shape == (*q_shape[:-1], kv_shape[-1]) and stats.fallback_reason == "empty"


CONFIG_CASES = {
    "ordering": (dict(ordering="token"), "ordering must be"),
    "alignment": (dict(causal_alignment="left"), "causal_alignment must be"),
    "segment_size": (dict(segment_size=0), "segment_size must be >= 1"),
    "block_m": (dict(block_m=48), "block_m must be positive and divide"),
    "threshold": (dict(threshold=-1.0), r"threshold must be in \[0, 1\]"),
    "threshold above 1": (dict(threshold=2.0), r"threshold must be in \[0, 1\]"),
    "rank_bits": (dict(rank_bits=40), "rank_bits must be in"),
    "ranked_keys": (dict(ranked_keys=-1), "ranked_keys must be None or >= 0"),
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


CONFIG_TYPE_CASES = {
    "segment_size float": (dict(segment_size=2.5), "segment_size must be int, got 2.5"),
    "block_m bool": (dict(block_m=True), "block_m must be int or None, got True"),
    "threshold str": (dict(threshold="0.01"), "threshold must be float or int, got '0.01'"),
    "strict int": (dict(strict=1), "strict must be bool, got 1"),
    "ordering int": (dict(ordering=1), "ordering must be str"),
}


@pytest.mark.parametrize("case", list(CONFIG_TYPE_CASES))
def test_bad_config_types(case):
    kwargs, message = CONFIG_TYPE_CASES[case]
    with pytest.raises(TypeError, match=message):
        S2OConfig(**kwargs)


def test_ranked_keys_follows_the_threshold():
    # block_n x (max(64, 1 / threshold) tiles rounded up to a power of two); 0 ranks everything.
    expected = {0.0: 0, 0.1: 4096, 0.03: 4096, 0.01: 8192, 0.004: 16384, 0.001: 65536}
    for threshold, ranked_keys in expected.items():
        assert S2OConfig(threshold=threshold).resolve_ranked_keys() == ranked_keys
    assert S2OConfig(threshold=0.004, block_n=32).resolve_ranked_keys() == 8192
    assert S2OConfig(threshold=0.1, ranked_keys=0).resolve_ranked_keys() == 0
    assert S2OConfig(ranked_keys=1000).resolve_ranked_keys() == 1000


def test_an_extension_that_does_not_load_says_how_to_rebuild(monkeypatch):
    """An extension built against another torch fails to load (e.g. libc10_cuda.so missing after
    an isolated pip build): the error names both torches and the rebuild command."""
    import sys

    from s2o import _extension

    monkeypatch.delattr(s2o, "_C")
    monkeypatch.setitem(sys.modules, "s2o._C", None)  # importing it now raises ImportError
    rebuild = r"(?s)built against torch .*pip install --no-build-isolation -e \."
    with pytest.raises(ImportError, match=rebuild):
        _extension.load()
