"""Hugging Face transformers integration: ``attn_implementation="s2o"`` and :func:`patch_llama`.

Importing this module registers ``"s2o"`` process-wide (idempotent; :func:`register` does it again
if someone overwrote it) with

- transformers' ``AttentionInterface``: :func:`s2o_attention_forward`, the attention function, with
  the calling convention and output layout of transformers' ``sdpa_attention_forward``;
- its ``AttentionMaskInterface``: :func:`s2o_mask`, which tells the attention function "plain
  causal, no padding" by returning ``None`` (see there). Registering a mask function is required:
  transformers builds no mask at all (padding would be ignored) for an implementation without one.

so that ``AutoModelForCausalLM.from_pretrained(..., attn_implementation="s2o")``,
``from_config(cfg, attn_implementation="s2o")`` and ``model.set_attn_implementation("s2o")`` work.
Registration happens at import because that is the only moment a user of ``attn_implementation=``
has to think of s2o at all; ``import s2o`` alone does not import transformers.

Routes of one attention call (queries ``[B, Hq, Nq, D]``, keys/values ``[B, Hkv, Nk, D]``):

=============================================  ===============================================
call                                           route
=============================================  ===============================================
Nq == 1 (decode step)                          dense SDPA over the cache (+ padding mask), the G
                                               query heads of a KV head packed as G rows. Not a
                                               fallback: strict mode does not raise here.
no mask, Nq > 1 (prefill, chunked prefill)     ``s2o.attention(is_causal=module.is_causal,
                                               enable_gqa=True)``, bottom-right causal (queries
                                               are the last Nq key positions). s2o itself sends
                                               Nk < ``config.min_keys`` to dense SDPA ("short").
a padding mask (left or right padding,        each row unpadded into one
prefill)                                       :func:`s2o.varlen_attention` call (sparse per
                                               sequence, recorded per sequence); padding rows
                                               get zeros.
another mask (sliding window, packed           ``s2o.attention(attn_mask=mask)``, i.e. dense SDPA
sequences, a custom 4D mask, static cache)     with the mask (fallback "attn_mask"; strict mode
                                               raises :class:`s2o.S2OFallbackError`).
=============================================  ===============================================

K/V keep their own head count everywhere (``enable_gqa=True``); they are never repeated.

Configuration: :func:`set_config` sets the process default; ``patch_llama(model, config)`` sets it
for one model. ``causal_alignment`` is always ``"bottom_right"`` here (transformers' convention);
the field of a given config is replaced. To see what the calls did, use :func:`record_stats`.

Supported transformers: >=5.17,<6 (``SUPPORTED_TRANSFORMERS``; others are refused at import, with
the install command; tests run with 5.24; the mask-interface arguments, ``sdpa_mask``,
``set_attn_implementation`` and the ``ALL_ATTENTION_FUNCTIONS.get_interface``
dispatch of Llama/Qwen2/Mistral were checked identical in the 5.17 source). Public names used:
``AttentionInterface.register``, ``AttentionMaskInterface.register``, ``masking_utils.sdpa_mask``,
``masking_utils.causal_mask_function``, ``PreTrainedModel.set_attn_implementation`` and the
documented ``config._attn_implementation`` (read only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from packaging import version
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from ..attention import S2OStats
from ..attention import attention as s2o_attention
from ..config import S2OConfig
from ..varlen import varlen_attention

logger = logging.getLogger("s2o")

IMPLEMENTATION = "s2o"
# The supported range, as pyproject's extras state it: from the first release whose mask
# interface passes the arguments s2o_mask takes, below the next major release.
SUPPORTED_TRANSFORMERS = ("5.17", "6")

if not (
    version.parse(SUPPORTED_TRANSFORMERS[0])
    <= version.parse(transformers.__version__)
    < version.parse(SUPPORTED_TRANSFORMERS[1])
):
    raise ImportError(
        f"s2o.integrations.transformers needs transformers>={SUPPORTED_TRANSFORMERS[0]},"
        f"<{SUPPORTED_TRANSFORMERS[1]} (its attention and mask interfaces), found "
        f"{transformers.__version__}: pip install 'transformers>={SUPPORTED_TRANSFORMERS[0]},"
        f"<{SUPPORTED_TRANSFORMERS[1]}'"
    )

# Dense attention for decode steps, captured before s2o.patch_sdpa can replace it.
_sdpa = F.scaled_dot_product_attention

# Attribute that patch_llama sets on a model's modules to give that model its own S2OConfig.
_MODULE_CONFIG_ATTR = "_s2o_config"


def _for_transformers(config: S2OConfig) -> S2OConfig:
    if config.causal_alignment == "bottom_right":
        return config
    return dataclasses.replace(config, causal_alignment="bottom_right")


_default_config = _for_transformers(S2OConfig())


def set_config(config: S2OConfig | None) -> S2OConfig:
    """Set the S2OConfig of every s2o attention call not under a ``patch_llama(model, config)``.

    ``None`` restores the package default (``S2OConfig()``). ``causal_alignment`` is replaced by
    ``"bottom_right"``. Returns the previous default, so a caller can put it back.
    """
    global _default_config
    if config is not None and not isinstance(config, S2OConfig):
        raise TypeError(f"config must be an s2o.S2OConfig or None, got {type(config).__name__}")
    previous = _default_config
    _default_config = _for_transformers(config if config is not None else S2OConfig())
    return previous


def get_config() -> S2OConfig:
    """The process default set by :func:`set_config`."""
    return _default_config


# ---------------------------------------------------------------------------------------------
# Stats


@dataclass
class AttentionCall:
    """One call of :func:`s2o_attention_forward`, as seen by :func:`record_stats`.

    Attributes:
        layer_idx: the attention module's ``layer_idx`` (None if it has none).
        num_queries, num_keys: Nq and Nk of the call.
        path: ``"sparse"`` or ``"dense"``.
        reason: why it went dense: ``"decode"`` or s2o.attention's fallback reason
            (``"attn_mask"``, ``"short"``, ...); None on the sparse path.
        stats: what s2o.attention reported (None for decode steps).
    """

    layer_idx: int | None
    num_queries: int
    num_keys: int
    path: str
    reason: str | None
    stats: S2OStats | None


class AttentionRecorder:
    """The attention calls made inside one :func:`record_stats` block."""

    def __init__(self) -> None:
        self.calls: list[AttentionCall] = []

    @property
    def sparse_calls(self) -> list[AttentionCall]:
        return [call for call in self.calls if call.path == "sparse"]

    @property
    def dense_calls(self) -> list[AttentionCall]:
        return [call for call in self.calls if call.path == "dense"]

    def dense_reasons(self) -> Counter:
        """How many calls went dense, by reason."""
        return Counter(call.reason for call in self.dense_calls)

    def density(self) -> float | None:
        """Tiles computed / tiles of dense attention, over all sparse calls (None if none)."""
        sparse = [call.stats for call in self.sparse_calls]
        if not sparse:
            return None
        computed = sum(stats.density * stats.dense_tiles for stats in sparse)
        return computed / sum(stats.dense_tiles for stats in sparse)

    def summary(self) -> str:
        density = self.density()
        sparse = f"{len(self.sparse_calls)} sparse"
        if density is not None:
            sparse += f" (density {density:.3f})"
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.dense_reasons().items()))
        dense = f"{len(self.dense_calls)} dense" + (f" ({reasons})" if reasons else "")
        return f"{len(self.calls)} attention calls: {sparse}, {dense}"


_recorders: list[AttentionRecorder] = []


@contextlib.contextmanager
def record_stats() -> Iterator[AttentionRecorder]:
    """Collect what every s2o attention call inside the block did.

    >>> with record_stats() as recorder:
    ...     model(input_ids)
    >>> recorder.summary()
    '4 attention calls: 4 sparse (density 0.412), 0 dense'

    While recording, s2o.attention measures its stages (``S2OStats.time_ms``, from CUDA events)
    and reads its tile counts, synchronising the device once per call, so time a model outside
    this block.
    """
    recorder = AttentionRecorder()
    _recorders.append(recorder)
    try:
        yield recorder
    finally:
        _recorders.remove(recorder)


def _record(module, num_queries, num_keys, path, reason, stats) -> None:
    call = AttentionCall(
        getattr(module, "layer_idx", None), num_queries, num_keys, path, reason, stats
    )
    for recorder in _recorders:
        recorder.calls.append(call)


# ---------------------------------------------------------------------------------------------
# The mask and attention functions registered as "s2o"


def _bottom_right_padding(
    mask_function, local_size, attention_mask, q_length, kv_length, q_offset, kv_offset
) -> tuple[bool, torch.Tensor | None]:
    """Whether the mask transformers asks for is bottom-right causal attention over the
    ``kv_length`` keys, give or take padding: the causal mask function without overlays or windows,
    and the last query at the last key's position (chunked prefill with a dynamic cache; not a
    static cache, whose key buffer runs past the queries). With it the padding mask of these keys
    (a view; None without a padding mask)."""
    if mask_function is not causal_mask_function or local_size is not None:
        return False, None
    if isinstance(q_offset, torch.Tensor) or torch.compiler.is_compiling():
        return False, None  # reading the offset or the padding mask would break a traced graph
    if q_offset - kv_offset != kv_length - q_length:
        return False, None
    if attention_mask is None:
        return True, None
    if attention_mask.shape[-1] < kv_offset + kv_length:
        return False, None  # transformers pads a short mask with "masked" (static caches)
    return True, attention_mask[:, kv_offset : kv_offset + kv_length]


def _is_plain_causal_bottom_right(
    mask_function, local_size, attention_mask, q_length, kv_length, q_offset, kv_offset
) -> bool:
    """True when the mask transformers asks for is exactly bottom-right causal attention over all
    ``kv_length`` keys (_bottom_right_padding) with no padding among these keys."""
    causal, padding = _bottom_right_padding(
        mask_function, local_size, attention_mask, q_length, kv_length, q_offset, kv_offset
    )
    return causal and (padding is None or bool(padding.all()))


def s2o_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    allow_is_causal_skip: bool = True,
    **kwargs,
) -> torch.Tensor | None:
    """The mask function registered as ``"s2o"`` (same arguments as transformers' ``sdpa_mask``).

    Returns None for plain bottom-right causal attention without padding, which sends the call to
    the sparse path; otherwise the boolean mask ``[B, 1, q_length, kv_length]`` (True: attend)
    that ``sdpa_mask`` materialises, which sends it to dense SDPA. sdpa's own skip is not used:
    it also returns None for a static cache's prefill, relying on SDPA's top-left ``is_causal``
    and on the sdpa attention function cutting the keys, which would not be right here.
    """
    if allow_is_causal_skip and _is_plain_causal_bottom_right(
        mask_function,
        kwargs.get("local_size"),
        attention_mask,
        q_length,
        kv_length,
        q_offset,
        kv_offset,
    ):
        return None
    mask = sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        allow_is_causal_skip=False,
        **kwargs,
    )
    ranges = _padding_ranges(
        mask_function, kwargs.get("local_size"), attention_mask, q_length, kv_length, q_offset,
        kv_offset,
    )  # fmt: skip
    if ranges is not None and isinstance(mask, torch.Tensor):
        # Read from the [B, kv] padding mask once per forward; spares every layer the host check
        # of the [B, 1, Nq, Nk] mask (_padded_causal_ranges).
        mask._s2o_padded_ranges = ranges
    return mask


def _padding_ranges(
    mask_function, local_size, attention_mask, q_length, kv_length, q_offset, kv_offset
):
    """For a padded batch's prefill (bottom-right causal with a ``[B, kv]`` padding mask:
    _bottom_right_padding), the ranges of :func:`_padded_causal_ranges` read from the padding
    mask alone; None for anything else."""
    causal, padding = _bottom_right_padding(
        mask_function, local_size, attention_mask, q_length, kv_length, q_offset, kv_offset
    )
    if not causal or padding is None or padding.dim() != 2 or not 1 < q_length <= kv_length:
        return None
    return _ranges_of_valid_keys(padding.bool().tolist(), q_length, kv_length)


def _decode_attention(query, key, value, attention_mask, dropout, scale) -> torch.Tensor:
    """Dense attention of one query row over all keys (bottom-right causal for Nq == 1 is no
    mask beyond padding). The G query heads of KV head h become G query rows of h
    (``[B, Hkv, G, D]``), as in transformers' ``pack_gqa``: K/V are not repeated and SDPA needs no
    ``enable_gqa``, which some of its backends do not take together with a mask."""
    batch, q_heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    if attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.shape[1] != 1):
        # A per-head mask does not broadcast over the packed rows; let SDPA handle the groups.
        return _sdpa(query, key, value, attention_mask, dropout, scale=scale, enable_gqa=True)
    packed = query.reshape(batch, kv_heads, q_heads // kv_heads, head_dim)
    out = _sdpa(packed, key, value, attention_mask, dropout, scale=scale)
    return out.reshape(out.shape[0], q_heads, 1, value.shape[-1])


def _padded_causal_ranges(mask, q_length: int, kv_length: int):
    """For a padded batch's prefill mask, per batch row its query rows and keys
    ``((row_begin, row_end), (key_begin, key_end))``; None for any other mask.

    A padded batch's mask (``sdpa_mask`` with padding, left or right) is bottom-right causal
    attention restricted to one contiguous run of valid keys per row: row b alone is the
    sequence of those keys, its queries the rows at their positions (the last ones: bottom-right
    again). Anything else (static caches, windows, packed documents, custom masks) gives None
    and stays on the dense path. Reads the mask on the host."""
    if (
        not isinstance(mask, torch.Tensor)
        or mask.dtype != torch.bool
        or mask.dim() != 4
        or mask.shape[1] != 1
        or tuple(mask.shape[2:]) != (q_length, kv_length)
        or q_length > kv_length
        or torch.compiler.is_compiling()
    ):
        return None
    offset = kv_length - q_length
    valid = mask[:, 0].any(dim=1)  # [B, Nk]: the keys some row sees (the last row sees them all)
    positions = torch.arange(q_length, device=mask.device) + offset
    causal = torch.arange(kv_length, device=mask.device)[None, :] <= positions[:, None]
    if not torch.equal(mask[:, 0], causal[None] & valid[:, None, :]):
        return None
    return _ranges_of_valid_keys(valid.tolist(), q_length, kv_length)


def _ranges_of_valid_keys(valid_rows: list[list[bool]], q_length: int, kv_length: int):
    """Per batch row with one run of valid keys (bottom-right causal), its query rows and keys
    ``((row_begin, row_end), (key_begin, key_end))``; None when a row has none or several runs."""
    offset = kv_length - q_length
    ranges = []
    for row in valid_rows:
        if True not in row:
            return None
        begin = row.index(True)
        end = kv_length - row[::-1].index(True)
        if not all(row[begin:end]):
            return None  # valid keys in several runs: not one sequence
        first = max(begin, offset) - offset
        ranges.append(((first, end - offset), (begin, end)))
    return ranges


def _padded_attention(module, query, key, value, ranges, scaling, config) -> torch.Tensor:
    """A padded batch's prefill as one varlen call of its unpadded sequences:
    ``[B, Nq, Hq, D]``, padding rows 0."""
    query_rows = [query[b, :, r0:r1].transpose(0, 1) for b, ((r0, r1), _) in enumerate(ranges)]
    key_rows = [key[b, :, k0:k1].transpose(0, 1) for b, (_, (k0, k1)) in enumerate(ranges)]
    value_rows = [value[b, :, k0:k1].transpose(0, 1) for b, (_, (k0, k1)) in enumerate(ranges)]
    lengths_q = [rows.shape[0] for rows in query_rows]
    lengths_k = [rows.shape[0] for rows in key_rows]

    def offsets(lengths):
        return torch.tensor([0, *lengths], device=query.device).cumsum(0).to(torch.int32)

    packed = varlen_attention(
        torch.cat(query_rows), torch.cat(key_rows), torch.cat(value_rows),
        offsets(lengths_q), offsets(lengths_k), max(lengths_q), max(lengths_k),
        causal=True, softmax_scale=scaling, config=config, return_stats=bool(_recorders),
    )  # fmt: skip
    if _recorders:
        packed, all_stats = packed
        for n_q, n_k, stats in zip(lengths_q, lengths_k, all_stats, strict=True):
            _record(module, n_q, n_k, stats.path, stats.fallback_reason, stats)
    out = query.new_zeros((query.shape[0], query.shape[2], query.shape[1], value.shape[-1]))
    for b, (((r0, r1), _), rows) in enumerate(zip(ranges, packed.split(lengths_q), strict=True)):
        out[b, r0:r1] = rows
    return out


def _config_for(module: torch.nn.Module) -> S2OConfig:
    config = getattr(module, _MODULE_CONFIG_ATTR, None)
    return config if config is not None else _default_config


def s2o_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The attention function registered as ``"s2o"``; same convention as transformers'
    ``sdpa_attention_forward``.

    Args:
        module: the calling attention module (its ``is_causal``, ``layer_idx`` and the config
            patch_llama may have set on it are read).
        query: ``[B, Hq, Nq, D]``. key, value: ``[B, Hkv, Nk, D]``, ``Hq % Hkv == 0``.
        attention_mask: None (plain causal, see :func:`s2o_mask`) or a mask broadcastable to
            ``[B, Hq, Nq, Nk]`` (bool, True: attend; or additive float).
        dropout, scaling, is_causal: as for sdpa; ``is_causal`` defaults to ``module.is_causal``.

    Returns:
        ``(attn_output [B, Nq, Hq, D] contiguous, None)``: no attention weights.
    """
    if kwargs.get("softcap") is not None:
        raise ValueError("s2o attention does not support `softcap`; use eager or flex_attention")
    if kwargs.get("position_bias") is not None:
        raise ValueError("s2o attention does not support `position_bias`; use sdpa or eager")
    config = _config_for(module)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)

    padded = None
    if query.shape[2] > 1 and is_causal and dropout == 0.0:
        padded = getattr(attention_mask, "_s2o_padded_ranges", None)
        if padded is not None and (
            tuple(attention_mask.shape[2:]) != (query.shape[2], key.shape[2])
            or len(padded) != query.shape[0]
        ):
            padded = None  # not this call's mask
        if padded is None:
            padded = _padded_causal_ranges(attention_mask, query.shape[2], key.shape[2])
    if padded is not None:
        return _padded_attention(module, query, key, value, padded, scaling, config), None
    if query.shape[2] == 1:
        out = _decode_attention(query, key, value, attention_mask, dropout, scaling)
        _record(module, query.shape[2], key.shape[2], "dense", "decode", None)
    else:
        args = (query, key, value, attention_mask, dropout, is_causal and attention_mask is None)
        if _recorders:
            out, stats = s2o_attention(
                *args, scaling, enable_gqa=True, config=config, return_stats=True
            )
            _record(module, query.shape[2], key.shape[2], stats.path, stats.fallback_reason, stats)
        else:
            out = s2o_attention(*args, scaling, enable_gqa=True, config=config)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"s2o"`` with transformers' attention and mask interfaces (done at import)."""
    AttentionInterface.register(IMPLEMENTATION, s2o_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, s2o_mask)


register()


# ---------------------------------------------------------------------------------------------
# patch_llama

_MISSING = object()


class S2OPatch:
    """What :func:`patch_llama` changed on one model; ``undo()`` (or leaving the ``with`` block)
    puts it back. Undoing twice does nothing the second time."""

    def __init__(self, model: PreTrainedModel, original_implementation, saved_module_configs):
        self.model = model
        self.original_implementation = original_implementation
        self._saved_module_configs = saved_module_configs
        self.active = True

    def undo(self) -> None:
        if not self.active:
            return
        self.active = False
        if self.model.config._attn_implementation != self.original_implementation:
            self.model.set_attn_implementation(self.original_implementation)
        for module, previous in self._saved_module_configs:
            if previous is _MISSING:
                delattr(module, _MODULE_CONFIG_ATTR)
            else:
                setattr(module, _MODULE_CONFIG_ATTR, previous)

    def __enter__(self) -> S2OPatch:
        return self

    def __exit__(self, *exc_info) -> None:
        self.undo()


def patch_llama(model: PreTrainedModel, config: S2OConfig | None = None) -> S2OPatch:
    """Route a loaded model's attention through s2o, in place, whatever ``attn_implementation`` it
    was loaded with; returns a handle whose ``undo()`` restores it (also a context manager).

    For Llama and every model whose attention modules dispatch through
    ``ALL_ATTENTION_FUNCTIONS`` on ``config._attn_implementation`` (Qwen2, Mistral, ...).

    Mechanism: the public ``model.set_attn_implementation("s2o")``, undone with
    ``set_attn_implementation(<the original>)``. Both the attention function and the mask function
    follow ``config._attn_implementation``, so they switch together (an eager model's additive
    masks become s2o's masks). Replacing the attention modules' ``forward`` instead would copy a
    method whose signature changed between transformers 5.17 and 5.24 (``past_key_values`` became
    ``cache``), and swapping the module-level ``ALL_ATTENTION_FUNCTIONS`` would patch every model of
    the class, not this one.

    Args:
        model: a loaded ``PreTrainedModel``. Nested sub-configs with their own, different
            implementations (multimodal models) are restored to the top-level one by ``undo``.
        config: the S2OConfig of this model's calls (its ``causal_alignment`` is replaced by
            ``"bottom_right"``); None: the default of :func:`set_config`. Stored as an attribute
            on the model's modules.

    Raises:
        TypeError: not a transformers ``PreTrainedModel``.
        RuntimeError: the model cannot switch its attention implementation (its attention modules
            do not dispatch through ``AttentionInterface``).
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"patch_llama needs a transformers PreTrainedModel, got {type(model)}")
    if config is not None and not isinstance(config, S2OConfig):
        raise TypeError(f"config must be an s2o.S2OConfig or None, got {type(config).__name__}")
    register()
    original = model.config._attn_implementation
    saved = []
    if config is not None:
        config = _for_transformers(config)
        for module in model.modules():
            saved.append((module, getattr(module, _MODULE_CONFIG_ATTR, _MISSING)))
            setattr(module, _MODULE_CONFIG_ATTR, config)
    handle = S2OPatch(model, original, saved)
    if original != IMPLEMENTATION:
        model.set_attn_implementation(IMPLEMENTATION)
    if model.config._attn_implementation != IMPLEMENTATION:
        handle.undo()
        raise RuntimeError(
            f"{type(model).__name__} did not switch to attn_implementation='s2o': its attention "
            "modules do not dispatch through transformers' AttentionInterface"
        )
    return handle


__all__ = [
    "AttentionCall",
    "AttentionRecorder",
    "S2OPatch",
    "get_config",
    "patch_llama",
    "record_stats",
    "register",
    "s2o_attention_forward",
    "s2o_mask",
    "set_config",
]
