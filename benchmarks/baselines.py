"""Block-sparse attention baselines in plain PyTorch, evaluated on the same inputs as s2o.

Every baseline keeps or drops whole tiles of ``block`` query rows x ``block`` keys and chooses, per
query head and query block, which key tiles to compute:

- ``dense``: every tile at or below the diagonal.
- ``sink+window`` (StreamingLLM): the first ``sink_tiles`` key tiles and the last ``w`` tiles up to
  the diagonal; knob ``w``.
- ``topk-*``: the ``k`` tiles of highest estimated score besides the diagonal and sink tiles; knob
  ``k``. ``cdf-*``: tiles by falling estimated mass until a share ``tau`` of the estimated mass is
  covered (diagonal and sink tiles always kept, their mass counted first); knob ``tau``. Two
  estimates: ``mean`` (FlexPrefill-style: softmax of mean-pooled query block . mean-pooled key
  block) and ``antidiag`` (XAttention: stride-S antidiagonal sums of a strided softmax).
- ``pbs-*`` (PBS-Attn, arXiv 2510.21270): the keys of every segment of ``S`` keys before the query's
  own segment are sorted by an importance score inside their segment, so heavy keys cluster into
  few permuted tiles; the query's own segment is computed densely in original order (causal);
  among the permuted history tiles, top-CDF on the mean-pooled estimate (the tile holding token 0
  always kept). Importance ``last_block`` (the paper: mean softmax of the last query block over
  the keys, one order for all queries) or ``segment`` (the mean query of the query's segment, as
  s2o scores: one order per query segment; our variant, not a published method). Unlike the
  paper's kernel, the own segment keeps original order, so only its causal tiles are counted
  (generous to PBS), and queries are not permuted (as in s2o).
- ``oracle``: top-CDF on the true tile masses (mean over the block's rows of each row's softmax
  mass in the tile): ideal selection in original order; nothing forced.

Conventions: causal self-attention (Nq == Nk, top-left), N a multiple of ``block``. **Density** =
tiles computed / tiles at or below the diagonal (a partially masked diagonal tile counts as one);
that is ``s2o.attention.dense_tiles`` for block_m = block_n = block. **Error** = MSE and relative L2
of the output, rounded to ``out_dtype`` like a kernel's output, against fp32 dense attention of the
same inputs.

How: per chunk of heads x query rows we compute once, for every (row, key tile), the tile's
softmax mass and unnormalised output in the frame of the row's max (what a flash kernel
accumulates). The output of any tile selection is the sum of the selected tiles' partials divided
by the sum of their masses; that costs about 1/block of dense attention per selection, so a whole
knob sweep costs little more than one dense pass per key order. Memory is bounded by
``chunk_elements`` (logit entries per chunk); nothing of size N x N is ever held.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from s2o.plan import softmax_scale

NEG_INF = float("-inf")
DEFAULT_TAUS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)


@dataclass(frozen=True)
class Method:
    """One baseline curve: a tile-selection rule swept over its knob.

    ``kind`` is one of ``dense``, ``window``, ``topk``, ``cdf``, ``oracle``, ``pbs``; ``estimate``
    (``mean`` or ``antidiag``) is the score of ``topk`` and ``cdf``; ``pbs_importance``
    (``last_block`` or ``segment``) and ``pbs_segment`` configure ``pbs``.
    """

    name: str
    kind: str
    knob: str
    values: tuple[float, ...]
    estimate: str = ""
    pbs_importance: str = ""
    pbs_segment: int = 0


def causal_tile_count(num_tokens: int, block: int) -> int:
    """Tiles of block x block at or below the diagonal for one head (query tile i sees key tiles
    0..i); the same count as ``s2o.attention.dense_tiles`` with block_m = block_n = block."""
    tiles = -(-num_tokens // block)
    return tiles * (tiles + 1) // 2


def default_methods(num_tokens: int, block: int = 64, taus=DEFAULT_TAUS) -> list[Method]:
    """The baseline family at their usual settings, each knob swept from sparse to dense."""
    tiles = num_tokens // block
    powers = tuple(float(2**i) for i in range(int(math.log2(max(tiles, 1))) + 1))
    methods = [
        Method("dense", "dense", "-", (1.0,)),
        Method("sink+window", "window", "window_tiles", powers),
        Method("topk-mean", "topk", "k", powers, estimate="mean"),
        Method("topk-antidiag", "topk", "k", powers, estimate="antidiag"),
        Method("cdf-mean", "cdf", "tau", taus, estimate="mean"),
        Method("cdf-antidiag", "cdf", "tau", taus, estimate="antidiag"),
    ]
    for importance, tag in (("last_block", "pbs"), ("segment", "pbs-qseg")):
        for segment in (256, 1024):
            if segment % block == 0 and segment < num_tokens:
                methods.append(
                    Method(
                        f"{tag}-s{segment}",
                        "pbs",
                        "tau",
                        taus,
                        pbs_importance=importance,
                        pbs_segment=segment,
                    )
                )
    methods.append(Method("oracle", "oracle", "tau", taus + (0.9999,)))
    return methods


# --------------------------------------------------------------------------------------------
# Tile partials and their merge


@dataclass
class TilePartials:
    """Per (head, query block, key tile) softmax numerators, in each row's own frame
    (exp(logit - row max over all its keys), the frame of dense attention).

    mass [H, Qc, G, block] fp32: per row of the query block, the sum over the tile's keys;
    acc [H, Qc, G, block * D] fp32: per row, the sum of the tile's values weighted alike.
    Qc = R / block query blocks, G = K / block key tiles.
    """

    mass: torch.Tensor
    acc: torch.Tensor


def tile_partials(
    scaled_query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    block: int,
) -> TilePartials:
    """Partials of every key tile for the given rows.

    scaled_query [H, R, D] fp32 (already times the softmax scale); key, value [H, K, D] fp32 in
    the order whose consecutive ``block`` keys form the tiles (R and K multiples of block);
    query_pos [R] and key_pos [H, K] or [K]: original positions for the causal mask (key_pos >
    query_pos masked).

    In the frame of the row max, a tile more than ~87 logits below it underflows to 0, as in any
    fp32 softmax; a selection that keeps only such tiles gets output 0 (see merge_tiles).
    """
    heads, rows, dim = scaled_query.shape
    num_keys = key.shape[1]
    groups, blocks = num_keys // block, rows // block
    logits = torch.matmul(scaled_query, key.transpose(1, 2))  # [H, R, K]
    logits.masked_fill_(key_pos[..., None, :] > query_pos[:, None], NEG_INF)
    probs = logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()  # each row sees >= 1 key
    probs = probs.view(heads, rows, groups, block)
    mass = probs.sum(dim=-1).view(heads, blocks, block, groups).transpose(2, 3)
    # [H, G, R, block] @ [H, G, block, D] -> [H, G, R, D] -> [H, Qc, G, block * D]
    acc = torch.matmul(probs.transpose(1, 2), value.view(heads, groups, block, dim))
    acc = acc.view(heads, groups, blocks, block * dim).transpose(1, 2).contiguous()
    return TilePartials(mass.contiguous(), acc)


def merge_blocks(partials: TilePartials, selections: torch.Tensor) -> torch.Tensor:
    """Outputs of several tile selections at once, in block layout.

    selections [S, H, Qc, G] bool; returns [H, Qc, S, block, D] fp32. One batched matmul per
    (head, query block) serves every selection, reading the partials once. Rows whose selected
    tiles all underflowed (see tile_partials) get 0.
    """
    heads, blocks, groups, block = partials.mass.shape
    chosen = selections.permute(1, 2, 0, 3).to(partials.acc.dtype)  # [H, Qc, S, G]
    numerator = torch.matmul(chosen, partials.acc)  # [H, Qc, S, block * D]
    denominator = torch.matmul(chosen, partials.mass)  # [H, Qc, S, block]
    count = selections.shape[0]
    numerator = numerator.view(heads, blocks, count, block, -1)
    tiny = torch.finfo(torch.float32).tiny
    return numerator / denominator.clamp_min(tiny)[..., None]


def merge_tiles(partials: TilePartials, selections: torch.Tensor) -> torch.Tensor:
    """Outputs of tile selections [S, H, Qc, G] bool as out [S, H, R, D] fp32."""
    out = merge_blocks(partials, selections)  # [H, Qc, S, block, D]
    heads, blocks, count, block, dim = out.shape
    return out.permute(2, 0, 1, 3, 4).reshape(count, heads, blocks * block, dim)


def true_tile_mass(partials: TilePartials, allowed: torch.Tensor) -> torch.Tensor:
    """Mean over each query block's rows of the row's softmax mass in each key tile:
    [H, Qc, G] from partials and allowed [Qc, G] (the tiles the rows may see)."""
    mass = partials.mass * allowed[None, :, :, None]
    share = mass / mass.sum(dim=2, keepdim=True)
    return share.mean(dim=-1)


# --------------------------------------------------------------------------------------------
# Estimates


def mean_pooled_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    block: int,
    scale: float,
    allowed: torch.Tensor,
) -> torch.Tensor:
    """Softmax over key tiles of (mean query block) . (mean key tile) * scale.

    query [H, R, D], key [H, K, D] (tiles = consecutive ``block`` keys), allowed [R / block, G]
    bool: the tiles the softmax runs over. Returns [H, R / block, G] fp32 (0 where not allowed).
    """
    heads, rows, dim = query.shape
    pooled_q = query.view(heads, rows // block, block, dim).mean(dim=2)
    pooled_k = key.view(heads, key.shape[1] // block, block, dim).mean(dim=2)
    logits = torch.matmul(pooled_q, pooled_k.transpose(1, 2)) * scale
    logits = logits.masked_fill(~allowed, NEG_INF)
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def antidiagonal_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    block: int,
    scale: float,
    row_start: int,
    stride: int = 8,
) -> torch.Tensor:
    """XAttention's estimate: the softmax of stride-S antidiagonal sums, summed per tile.

    Reshaped query row a is the concatenation of query rows aS+S-1, ..., aS (reversed) and reshaped
    key b of keys bS, ..., bS+S-1, so q_a . k_b sums one antidiagonal of the S x S sub-block; the
    strided logits (times scale / S) get the causal mask b <= a and a softmax per reshaped row, and
    are summed per tile and divided by block / S. query [H, R, D] holds rows row_start.. (a
    multiple of S), key [H, K, D] keys 0..K-1. Returns [H, R / block, K / block], rows sum to 1.
    """
    heads, rows, dim = query.shape
    num_keys = key.shape[1]
    strided_q = torch.cat([query[:, stride - 1 - s :: stride] for s in range(stride)], dim=-1)
    strided_k = torch.cat([key[:, s::stride] for s in range(stride)], dim=-1)
    logits = torch.matmul(strided_q, strided_k.transpose(1, 2)) * (scale / stride)
    a = torch.arange(row_start // stride, (row_start + rows) // stride, device=query.device)
    b = torch.arange(num_keys // stride, device=query.device)
    logits.masked_fill_(b[None, :] > a[:, None], NEG_INF)
    probs = torch.softmax(logits, dim=-1)
    per_block = block // stride
    sums = probs.view(heads, rows // block, per_block, num_keys // block, per_block).sum((2, 4))
    return sums / per_block


# --------------------------------------------------------------------------------------------
# Selection rules: all return [H, Qc, G] bool selections of tiles


def window_selection(query_blocks: torch.Tensor, groups: int, window: int, sink_tiles: int = 1):
    """Key tiles max(0, i - window + 1)..i and 0..sink_tiles-1 for query block i: [Qc, G]."""
    g = torch.arange(groups, device=query_blocks.device)[None, :]
    i = query_blocks[:, None]
    return ((g <= i) & (g > i - window)) | (g < sink_tiles)


def topk_selection(scores: torch.Tensor, k: int, forced: torch.Tensor, allowed: torch.Tensor):
    """forced plus the k highest-scoring allowed tiles that are not forced.

    scores [H, Qc, G]; forced, allowed [Qc, G] or [H, Qc, G] bool."""
    candidates = scores.masked_fill(forced | ~allowed, NEG_INF)
    k = min(int(k), scores.shape[-1])
    values, index = candidates.topk(k, dim=-1)
    chosen = torch.zeros_like(candidates, dtype=torch.bool).scatter_(-1, index, values > NEG_INF)
    return chosen | forced


def top_cdf_selection(
    probs: torch.Tensor, tau: float, forced: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """forced tiles, then allowed tiles by falling probability while the mass covered before
    adding a tile is below tau (the XAttention rule). probs [H, Qc, G] (each row sums to the
    estimated total, normally 1); forced, allowed [Qc, G] or [H, Qc, G] bool."""
    probs = probs.masked_fill(~allowed, 0.0)
    total = probs.sum(dim=-1, keepdim=True)
    forced_mass = (probs * forced).sum(dim=-1, keepdim=True)
    candidates = probs.masked_fill(forced | ~allowed, -1.0)
    values, index = candidates.sort(dim=-1, descending=True)
    covered_before = forced_mass + values.clamp_min(0.0).cumsum(dim=-1) - values.clamp_min(0.0)
    take = (covered_before < tau * total) & (values >= 0.0)
    chosen = torch.zeros_like(candidates, dtype=torch.bool).scatter_(-1, index, take)
    return chosen | forced


# --------------------------------------------------------------------------------------------
# PBS key order


def pbs_segment_order(importance: torch.Tensor, segment: int, history: int, total: int):
    """Key order for a query segment whose history is keys [0, history): every key segment of the
    history sorted by falling importance (ties: lower index first), then keys history..total-1 in
    original order. importance [H, >= history]; returns [H, total] int64 original positions."""
    heads = importance.shape[0]
    device = importance.device
    tail = torch.arange(history, total, device=device).expand(heads, -1)
    if history == 0:
        return tail.contiguous()
    scores = importance[:, :history].reshape(heads, history // segment, segment)
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    order = order + torch.arange(0, history, segment, device=device)[None, :, None]
    return torch.cat([order.reshape(heads, history), tail], dim=1)


def last_block_importance(query: torch.Tensor, key: torch.Tensor, block: int, scale: float):
    """PBS-Attn's key importance: the mean over the last query block's rows of their causal
    softmax over all keys. query [H, N, D], key [H, N, D]; returns [H, N] fp32."""
    num_tokens = query.shape[1]
    rows = query[:, num_tokens - block :].float()
    logits = torch.matmul(rows, key.float().transpose(1, 2)) * scale
    pos = torch.arange(num_tokens - block, num_tokens, device=query.device)
    keys = torch.arange(num_tokens, device=query.device)
    logits.masked_fill_(keys[None, :] > pos[:, None], NEG_INF)
    return torch.softmax(logits, dim=-1).mean(dim=1)


# --------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class CurvePoint:
    """One knob value of one method: density and error over all heads, and per query head
    (``head_mse``, ``head_density``: [B * Hq], batch-major)."""

    method: str
    knob: str
    value: float
    density: float
    mse: float
    rel_l2: float
    head_mse: list[float] = field(default_factory=list)
    head_density: list[float] = field(default_factory=list)


@dataclass
class BaselineResult:
    """reference [B, Hq, N, D] fp32 dense output; points of every method in knob order."""

    reference: torch.Tensor
    points: list[CurvePoint]


class _ErrorSums:
    """Squared error and tile count per (method, knob value) and flat head."""

    def __init__(self, num_heads: int, device):
        self.num_heads, self.device = num_heads, device
        self.squared: dict[tuple[str, float], torch.Tensor] = {}
        self.tiles: dict[tuple[str, float], torch.Tensor] = {}

    def add(self, key, heads: slice, squared: torch.Tensor, tiles: torch.Tensor) -> None:
        if key not in self.squared:
            self.squared[key] = torch.zeros(self.num_heads, dtype=torch.float64, device=self.device)
            self.tiles[key] = torch.zeros(self.num_heads, dtype=torch.int64, device=self.device)
        self.squared[key][heads] += squared.double()
        self.tiles[key][heads] += tiles


def _score_selections(
    items: list[tuple[tuple[str, float], torch.Tensor]],
    partials: TilePartials,
    heads: slice,
    reference: torch.Tensor,
    allowed: torch.Tensor,
    out_dtype: torch.dtype,
    sums: _ErrorSums,
    max_elements: int,
) -> None:
    """Merges the selections of items [(key, selection [H, Qc, G] or [Qc, G])] in batches and
    adds their squared error against reference [H, R, D] and their tile count (within allowed
    [Qc, G])."""
    num_heads, blocks, groups, block = partials.mass.shape
    dim = partials.acc.shape[-1] // block
    reference = reference.view(num_heads, blocks, 1, block, dim)
    per_batch = max(1, max_elements // (num_heads * blocks * block * dim))
    for start in range(0, len(items), per_batch):
        batch = items[start : start + per_batch]
        selections = torch.stack([sel.expand(num_heads, -1, -1) & allowed for _, sel in batch])
        outs = merge_blocks(partials, selections).to(out_dtype).float()  # [H, Qc, S, block, D]
        squared = (outs - reference).square().sum(dim=(1, 3, 4))  # [H, S]
        tiles = selections.sum(dim=(2, 3))  # [S, H]
        for i, (key, _) in enumerate(batch):
            sums.add(key, heads, squared[:, i], tiles[i])


def _heads_per_chunk(rows: int, keys: int, total_heads: int, chunk_elements: int) -> int:
    return max(1, min(total_heads, chunk_elements // max(1, rows * keys)))


def evaluate_baselines(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    methods: list[Method],
    *,
    block: int = 64,
    scale: float | None = None,
    out_dtype: torch.dtype | None = None,
    chunk_elements: int = 1 << 25,
    row_chunk: int = 1024,
    antidiag_stride: int = 8,
    sink_tiles: int = 1,
) -> BaselineResult:
    """Density and error of every method at every knob value, on causal self-attention.

    query [B, Hq, N, D], key/value [B, Hkv, N, D] (GQA by head groups), N a multiple of block.
    ``out_dtype``: outputs are rounded to it before the error (default: the input dtype).
    ``chunk_elements``: logit entries per chunk of heads x rows x keys; peak memory is about
    ``chunk_elements`` x (12 + 8 D / block) bytes.
    """
    batch, q_heads, num_tokens, dim = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    if num_tokens % block or block % antidiag_stride:
        raise ValueError(
            f"N={num_tokens} must be a multiple of block={block}, and block of the stride"
        )
    if key.shape[2] != num_tokens:
        raise ValueError("the baselines evaluate causal self-attention: Nq must equal Nk")
    scale = softmax_scale(dim, scale)
    out_dtype = query.dtype if out_dtype is None else out_dtype
    device = query.device
    flat_heads = batch * q_heads
    q = query.reshape(flat_heads, num_tokens, dim)
    k = key.reshape(batch * kv_heads, num_tokens, dim)
    v = value.reshape(batch * kv_heads, num_tokens, dim)
    head_ids = torch.arange(flat_heads, device=device)
    kv_of = (head_ids // q_heads) * kv_heads + (head_ids % q_heads) // group

    reference = torch.empty(flat_heads, num_tokens, dim, dtype=torch.float32, device=device)
    reference_sq = torch.zeros(flat_heads, dtype=torch.float64, device=device)
    sums = _ErrorSums(flat_heads, device)
    original = [m for m in methods if m.kind != "pbs"]

    # Pass 1: tiles in original order (dense reference, window, top-k, top-CDF, oracle).
    rows_per_chunk = min(num_tokens, max(block, row_chunk // block * block))
    heads_per_chunk = _heads_per_chunk(rows_per_chunk, num_tokens, flat_heads, chunk_elements)
    for h0 in range(0, flat_heads, heads_per_chunk):
        heads = slice(h0, min(h0 + heads_per_chunk, flat_heads))
        for r0 in range(0, num_tokens, rows_per_chunk):
            r1 = min(r0 + rows_per_chunk, num_tokens)
            qf = q[heads, r0:r1].float()
            kf, vf = k[kv_of[heads], :r1].float(), v[kv_of[heads], :r1].float()
            query_pos = torch.arange(r0, r1, device=device)
            key_pos = torch.arange(r1, device=device)
            partials = tile_partials(qf * scale, kf, vf, query_pos, key_pos, block)
            query_blocks = torch.arange(r0 // block, r1 // block, device=device)
            groups = r1 // block
            g = torch.arange(groups, device=device)
            causal = g[None, :] <= query_blocks[:, None]  # [Qc, G]
            forced = (g[None, :] == query_blocks[:, None]) | (g[None, :] < sink_tiles)
            out = merge_tiles(partials, causal[None, None])[0]
            reference[heads, r0:r1] = out
            reference_sq[heads] += out.square().sum(dim=(1, 2)).double()
            estimates = {}
            items = []
            for method in original:
                if method.kind in ("topk", "cdf", "oracle"):
                    name = method.estimate if method.kind != "oracle" else "oracle"
                    if name not in estimates:
                        estimates[name] = _estimate(
                            name, qf, kf, partials, causal, block, scale, r0, antidiag_stride
                        )
                    est = estimates[name]
                for knob in method.values:
                    if method.kind == "dense":
                        selection = causal
                    elif method.kind == "window":
                        selection = window_selection(query_blocks, groups, int(knob), sink_tiles)
                    elif method.kind == "topk":
                        selection = topk_selection(est, int(knob), forced, causal)
                    elif method.kind == "cdf":
                        selection = top_cdf_selection(est, knob, forced, causal)
                    elif method.kind == "oracle":
                        selection = top_cdf_selection(est, knob, torch.zeros_like(causal), causal)
                    else:
                        raise ValueError(f"unknown method kind {method.kind!r}")
                    items.append(((method.name, knob), selection))
            _score_selections(items, partials, heads, out, causal, out_dtype, sums, chunk_elements)
            del partials, estimates, items

    # Pass 2: PBS, one pass per (importance, segment): keys permuted per query segment.
    for method in (m for m in methods if m.kind == "pbs"):
        _evaluate_pbs(
            method, q, k, v, kv_of, reference, sums, block, scale, out_dtype, chunk_elements
        )

    dense_tiles = flat_heads * causal_tile_count(num_tokens, block)
    total_ref = float(reference_sq.sum())
    points = []
    for method in methods:
        for knob in method.values:
            squared, tiles = sums.squared[(method.name, knob)], sums.tiles[(method.name, knob)]
            points.append(
                CurvePoint(
                    method=method.name,
                    knob=method.knob,
                    value=float(knob),
                    density=float(tiles.sum()) / dense_tiles,
                    mse=float(squared.sum()) / (flat_heads * num_tokens * dim),
                    rel_l2=math.sqrt(float(squared.sum()) / total_ref),
                    head_mse=(squared / (num_tokens * dim)).tolist(),
                    head_density=(tiles / causal_tile_count(num_tokens, block)).tolist(),
                )
            )
    return BaselineResult(reference.view(batch, q_heads, num_tokens, dim), points)


def _estimate(name, qf, kf, partials, causal, block, scale, row_start, stride) -> torch.Tensor:
    if name == "mean":
        return mean_pooled_probs(qf, kf, block, scale, causal)
    if name == "antidiag":
        return antidiagonal_probs(qf, kf, block, scale, row_start, stride)
    if name == "oracle":
        return true_tile_mass(partials, causal)
    raise ValueError(f"unknown estimate {name!r}")


def _evaluate_pbs(
    method, q, k, v, kv_of, reference, sums, block, scale, out_dtype, chunk_elements
) -> None:
    """PBS tiles: per query segment, the history keys permuted inside their key segments."""
    flat_heads, num_tokens, dim = q.shape
    segment = method.pbs_segment
    if segment % block:
        raise ValueError(f"PBS segment {segment} must be a multiple of block {block}")
    device = q.device
    heads_per_chunk = _heads_per_chunk(segment, num_tokens, flat_heads, chunk_elements)
    for h0 in range(0, flat_heads, heads_per_chunk):
        heads = slice(h0, min(h0 + heads_per_chunk, flat_heads))
        k_heads, v_heads = k[kv_of[heads]], v[kv_of[heads]]
        if method.pbs_importance == "last_block":
            importance = last_block_importance(q[heads], k_heads, block, scale)
        elif method.pbs_importance == "segment":
            k_float = k_heads.float()
        else:
            raise ValueError(f"unknown PBS importance {method.pbs_importance!r}")
        for r0 in range(0, num_tokens, segment):
            r1 = min(r0 + segment, num_tokens)
            qf = q[heads, r0:r1].float()
            if method.pbs_importance == "segment":
                representative = qf.mean(dim=1, keepdim=True)  # [H, 1, D]
                importance = torch.matmul(representative, k_float[:, :r0].transpose(1, 2))[:, 0]
            order = pbs_segment_order(importance, segment, r0, r1)  # [H, r1]
            gather = order[..., None].expand(-1, -1, dim)
            kf = torch.gather(k_heads[:, :r1], 1, gather).float()
            vf = torch.gather(v_heads[:, :r1], 1, gather).float()
            query_pos = torch.arange(r0, r1, device=device)
            partials = tile_partials(qf * scale, kf, vf, query_pos, order, block)
            query_blocks = torch.arange(r0 // block, r1 // block, device=device)
            groups, history_groups = r1 // block, r0 // block
            g = torch.arange(groups, device=device)
            causal = g[None, :] <= query_blocks[:, None]  # [Qc, G]
            own_segment = causal & (g[None, :] >= history_groups)
            history = (g < history_groups)[None, :].expand_as(causal)
            # The tile holding token 0 (segment 0's permuted order), always kept.
            sink_group = (order == 0).int().argmax(dim=1) // block  # [H]
            forced = (g[None, None, :] == sink_group[:, None, None]) & history
            items = []
            if history_groups:
                est = mean_pooled_probs(qf, kf, block, scale, history)
            for knob in method.values:
                selection = own_segment[None]
                if history_groups:
                    selection = selection | top_cdf_selection(est, knob, forced, history)
                items.append(((method.name, knob), selection))
            _score_selections(
                items,
                partials,
                heads,
                reference[heads, r0:r1],
                causal,
                out_dtype,
                sums,
                chunk_elements,
            )
