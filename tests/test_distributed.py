"""s2o.distributed on the CPU with gloo: context-parallel s2o equals single-process s2o (index
lists bit-equal, outputs to tolerance, the same heads recomputed), both layouts, 2 and 4 ranks;
bad or disagreeing arguments raise on every rank; a rank that exits makes the others raise, not
hang; a transformers Llama with tp_plan="auto" on s2o gives the single-process logits.

Each test spawns its ranks (torch.multiprocessing, spawn) and runs its cases inside them; a
rank's failure reaches the test with its traceback, and ranks still running after the test's
deadline are killed and fail it."""

from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import s2o
from s2o import distributed as cp
from s2o.data import structured_qkv
from s2o.layout import SegmentLayout
from s2o.plan import Plan
from tests.conftest import TOLERANCES

_DEADLINE_S = 300  # a whole spawned test, startup included (a hang fails it)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank, world_size, port, timeout_s, backend, worker, args):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)  # the ranks share the machine's cores
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend, rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )  # fmt: skip
    try:
        worker(rank, world_size, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn(world_size, worker, *args, timeout_s=60, backend="gloo"):
    """Runs ``worker(rank, world_size, *args)`` in ``world_size`` ranks of ``backend``; raises
    what a rank raised, or fails when a rank is still running at the deadline."""
    context = mp.start_processes(
        _rank_main, args=(world_size, _free_port(), timeout_s, backend, worker, args),
        nprocs=world_size, join=False, start_method="spawn",
    )  # fmt: skip
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=_DEADLINE_S)
    while not context.join(timeout=1):
        if datetime.datetime.now() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"ranks still running after {_DEADLINE_S} s (a hang)")


def _inputs(length, q_heads, kv_heads, dtype, seed):
    # Structured attention (sinks, window, stripes, slashes) so that rankings and stops matter.
    return structured_qkv(
        length, q_heads=q_heads, kv_heads=kv_heads, head_dim=64, dtype=dtype, seed=seed,
        topic_span=256,
    )  # fmt: skip


def _single_process(q, k, v, config, is_causal=True):
    """s2o.attention on the whole sequence, and its plan's index lists and log-sum-exp."""
    out, stats = s2o.attention(
        q, k, v, is_causal=is_causal, enable_gqa=True, config=config, return_stats=True
    )
    plan = Plan.for_call(config, q.shape, k.shape, is_causal=is_causal)
    _, indices, (_, lse, _) = plan.run(q, k, v)
    return out, stats, indices, lse


def _check_context_parallel(rank, world_size, q, k, v, config, layout, is_causal=True):
    out, stats, indices, lse = _single_process(q, k, v, config, is_causal)
    shards = [cp.shard_sequence(t, layout=layout, config=config) for t in (q, k, v)]
    cp_out, cp_lse, cp_stats = cp.context_parallel_attention(
        *shards, layout=layout, is_causal=is_causal, config=config, return_lse=True,
        return_stats=True,
    )  # fmt: skip
    where = f"rank {rank}/{world_size}, {layout}, N={q.shape[2]}, {q.dtype}, {config}"
    shard_out = cp.shard_sequence(out, layout=layout, config=config)
    atol, rtol = TOLERANCES[q.dtype]
    torch.testing.assert_close(cp_out, shard_out, atol=atol, rtol=rtol, msg=where)
    assert torch.equal(cp_stats.recomputed, stats.recomputed), where
    torch.testing.assert_close(cp_stats.head_error, stats.head_error, atol=1e-6, rtol=1e-4)
    if not stats.recomputed.any():
        shard_lse = cp.shard_sequence(lse, layout=layout, config=config, dim=-1)
        torch.testing.assert_close(cp_lse, shard_lse, atol=1e-5, rtol=1e-5, msg=where)
    # The gathered sequence is the whole one, and every piece ranks its segments' histories
    # exactly as the single process did.
    torch.testing.assert_close(cp.gather_sequence(cp_out, layout=layout, config=config), out,
                               atol=atol, rtol=rtol)  # fmt: skip
    bounds = cp.shard_bounds(q.shape[2], world_size, layout, config.segment_size)[rank]
    pieces = cp._query_pieces(shards[0], k, v, bounds, config, is_causal, None)
    layout_all = SegmentLayout(q.shape[2], k.shape[2], config.segment_size, 0, is_causal)
    for piece in pieces:
        first = piece.first_row // config.segment_size
        last = first + piece.plan.layout.num_segments
        begin, end = layout_all.history_offset(first), layout_all.history_offset(last)
        piece_indices = piece.plan.permute(piece.plan.estimate(piece.query, piece.key))
        assert torch.equal(piece_indices, indices[..., begin:end]), where
    return cp_stats


def _context_parallel_cases(rank, world_size, cases, device="cpu"):
    for length, q_heads, kv_heads, dtype, layout, config_kw, is_causal in cases:
        config = s2o.S2OConfig(min_keys=0, **config_kw)
        q, k, v = _inputs(length, q_heads, kv_heads, dtype, seed=length + q_heads)
        q, k, v = q.to(device), k.to(device), v.to(device)
        _check_context_parallel(rank, world_size, q, k, v, config, layout, is_causal)


_SMALL_SEGMENTS = dict(segment_size=64, block_n=32)


@pytest.mark.parametrize("layout", cp.LAYOUTS)
def test_context_parallel_equals_single_process_on_2_ranks(layout):
    cases = [
        # (length, Hq, Hkv, dtype, layout, config, causal): lengths not multiples of the shard,
        # segment or tile; MHA, GQA, MQA; the default config and smaller tiles.
        (1000, 4, 4, torch.float32, layout, {}, True),
        (777, 4, 2, torch.bfloat16, layout, _SMALL_SEGMENTS, True),
        (1300, 4, 1, torch.float32, layout, dict(threshold=0.0), True),
        (600, 2, 1, torch.float32, layout, _SMALL_SEGMENTS, False),
        (130, 2, 2, torch.float32, layout, {}, True),  # fewer segments than chunks: empty pieces
    ]
    _spawn(2, _context_parallel_cases, cases)


@pytest.mark.parametrize("layout", cp.LAYOUTS)
def test_context_parallel_equals_single_process_on_4_ranks(layout):
    cases = [
        (1500, 4, 2, torch.float32, layout, _SMALL_SEGMENTS, True),
        (1100, 2, 2, torch.bfloat16, layout, {}, True),
    ]
    _spawn(4, _context_parallel_cases, cases)


@pytest.mark.cuda
def test_context_parallel_on_the_gpu_through_nccl():
    # One rank per GPU this machine has (the collectives' device path: NCCL takes CUDA tensors).
    world_size = torch.cuda.device_count()
    cases = [(5000, 8, 2, torch.bfloat16, layout, {}, True) for layout in cp.LAYOUTS] + [
        (3000, 4, 4, torch.float16, "zigzag", dict(segment_size=64), True)
    ]
    _spawn(world_size, _context_parallel_cases, cases, "cuda", backend="nccl")


def _budget_cases(rank, world_size):
    # A budget between two heads' errors: some heads are over it, and every rank must recompute
    # the same ones as one process does (the estimate is over all ranks' rows).
    config = s2o.S2OConfig(min_keys=0, threshold=0.05, patience=1, tail_threshold=None,
                           **_SMALL_SEGMENTS)  # fmt: skip
    q, k, v = _inputs(1200, 8, 2, torch.float32, seed=5)
    _, stats = s2o.attention(q, k, v, is_causal=True, enable_gqa=True, config=config,
                             return_stats=True)  # fmt: skip
    errors = stats.head_error.flatten().sort().values
    gap = int((errors[1:] - errors[:-1]).argmax())
    budget = float(errors[gap] + errors[gap + 1]) / 2
    config = s2o.S2OConfig(**{**vars(config), "error_budget": budget})
    for layout in cp.LAYOUTS:
        cp_stats = _check_context_parallel(rank, world_size, q, k, v, config, layout)
        assert 0 < cp_stats.recomputed_heads < cp_stats.recomputed.numel()


def test_context_parallel_recomputes_the_same_heads_as_one_process():
    _spawn(2, _budget_cases)


def _dense_fallback_cases(rank, world_size):
    # Under min_keys the whole sequence goes dense, as s2o.attention's does (decided by the whole
    # length, not the shard's).
    config = s2o.S2OConfig(**_SMALL_SEGMENTS)  # min_keys 16384
    q, k, v = _inputs(700, 4, 2, torch.float32, seed=3)
    out = s2o.attention(q, k, v, is_causal=True, enable_gqa=True, config=config)
    shards = [cp.shard_sequence(t, layout="zigzag", config=config) for t in (q, k, v)]
    cp_out, stats = cp.context_parallel_attention(*shards, layout="zigzag", config=config,
                                                  return_stats=True)  # fmt: skip
    assert stats.path == "dense" and stats.fallback_reason == "short"
    expected = cp.shard_sequence(out, layout="zigzag", config=config)
    torch.testing.assert_close(cp_out, expected, atol=2e-5, rtol=2e-5)
    strict = s2o.S2OConfig(strict=True, **_SMALL_SEGMENTS)
    with pytest.raises(s2o.S2OFallbackError, match="short"):
        cp.context_parallel_attention(*shards, layout="zigzag", config=strict)


def test_context_parallel_falls_back_to_dense_as_one_process_does():
    _spawn(2, _dense_fallback_cases)


def _error_cases(rank, world_size):
    config = s2o.S2OConfig(min_keys=0)
    q, k, v = _inputs(512, 4, 2, torch.float32, seed=1)
    shards = [cp.shard_sequence(t, config=config) for t in (q, k, v)]

    # One rank's bad argument: it names the argument there, and the other rank raises too.
    bad_query = shards[0][0] if rank == 1 else shards[0]
    expected = r"rank 1\): query must be \[B, H, n, D\]" if rank == 1 else r"rank\(s\) \[1\]"
    with pytest.raises(ValueError, match=expected):
        cp.context_parallel_attention(bad_query, shards[1], shards[2], config=config)

    # Ranks that disagree (head counts, layout, config): every rank names the field.
    with pytest.raises(ValueError, match="disagree on query heads"):
        cp.context_parallel_attention(shards[0][:, : 2 + 2 * rank], shards[1], shards[2],
                                      config=config)  # fmt: skip
    with pytest.raises(ValueError, match="disagree on layout"):
        cp.context_parallel_attention(*shards, layout=cp.LAYOUTS[rank], config=config)
    with pytest.raises(ValueError, match="disagree on config"):
        cp.context_parallel_attention(*shards, config=s2o.S2OConfig(min_keys=rank))

    # Shards not cut at segment boundaries.
    cut = 100 if rank == 0 else 412
    begin = 0 if rank == 0 else 100
    uneven = [t[:, :, begin : begin + cut] for t in (q, k, v)]
    with pytest.raises(ValueError, match="shard_sequence"):
        cp.context_parallel_attention(*uneven, config=config)
    with pytest.raises(ValueError, match="layout must be one of"):
        cp.shard_sequence(q, layout="ring")

    # A rank that exits instead of calling: the other raises (within the group's timeout).
    if rank == 1:
        os._exit(0)
    with pytest.raises(RuntimeError, match="a rank failed, exited, or did not call"):
        cp.context_parallel_attention(*shards, config=config)


def test_context_parallel_errors_reach_every_rank():
    _spawn(2, _error_cases, timeout_s=15)


def test_context_parallel_needs_an_initialised_process_group():
    q, k, v = _inputs(256, 2, 2, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match="init_process_group"):
        cp.context_parallel_attention(q, k, v)


def _tensor_parallel_llama(rank, world_size, path, expected_path):
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM

    from s2o.integrations import transformers as s2o_transformers

    s2o_transformers.set_config(s2o.S2OConfig(min_keys=0, **_SMALL_SEGMENTS))
    # A CPU mesh: on a machine with GPUs transformers would otherwise put rank r on GPU r.
    mesh = init_device_mesh("cpu", (world_size,))
    model = AutoModelForCausalLM.from_pretrained(
        path, tp_plan="auto", device_mesh=mesh, attn_implementation="s2o", dtype=torch.float32
    )
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert weight.to_local().shape[0] == weight.shape[0] // world_size  # each rank: its heads
    ids = torch.load(expected_path)["ids"]
    with s2o_transformers.record_stats() as recorder, torch.no_grad():
        logits = model(ids).logits
    assert recorder.sparse_calls and not recorder.dense_calls, recorder.summary()
    expected = torch.load(expected_path)["logits"]
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=2e-4)


def test_tensor_parallel_llama_on_s2o_gives_the_single_process_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    from s2o.integrations import transformers as s2o_transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "model")
    model.set_attn_implementation("s2o")
    s2o_transformers.set_config(s2o.S2OConfig(min_keys=0, **_SMALL_SEGMENTS))
    try:
        ids = torch.randint(0, 256, (1, 700))
        with s2o_transformers.record_stats() as recorder, torch.no_grad():
            logits = model(ids).logits
        assert recorder.sparse_calls and not recorder.dense_calls
    finally:
        s2o_transformers.set_config(None)
    torch.save({"ids": ids, "logits": logits}, tmp_path / "expected.pt")
    _spawn(2, _tensor_parallel_llama, str(tmp_path / "model"), str(tmp_path / "expected.pt"))
