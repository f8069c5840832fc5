"""transformers' side of the patch: the attention and mask functions registered under IMPL_NAME.

The mask function hands the attention a 2D key-padding mask (or None), never a dense
[batch, 1, Sq, Sk] mask, for causal and sliding-window causal masks alike, as transformers'
flash-attention mask does: the window itself comes to the attention function as its
`sliding_window` kwarg, with `softcap` and the `s_aux` sinks. The attention function calls the
Triton op, or, for a call the kernels don't serve, the model's original implementation with a
one-time warning.
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
from transformers import masking_utils
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from .archs.base import ArchSpec
from .ops import AttentionInputError, attention_bshd
from .reference import visibility_mask

# The attn_implementation name. It must not contain "flash": transformers treats any such name as a
# flash-attn package (hub kernel loading, FA2-specific generation paths).
IMPL_NAME = "fp_triton"

# transformers 5 records attention weights with hooks while `output_attentions=True`; the flag is only
# visible in its output collector (a private API, hence the guard).
try:
    from transformers.utils.output_capturing import _active_collector
except ImportError:
    _active_collector = None


class FallbackError(RuntimeError):
    """A call the kernels cannot serve, under fallback="error"."""


@dataclass
class PatchState:
    """Per patched config: what to restore and how to fall back."""

    original_impl: str
    arch: ArchSpec
    fallback: str
    sdpa_ok: bool = True  # the model class takes transformers' sdpa (Gemma 2 and gpt-oss do not): else eager
    fallbacks: Counter = field(default_factory=Counter)
    undo: list = field(default_factory=list)  # legacy path: callables that remove the module patches
    finalizers: list = field(default_factory=list)  # drop this state if its config dies first


# id(config) -> state. Keyed by id because transformers configs define __eq__ and are unhashable.
STATES: dict[int, PatchState] = {}


def _attention_weights_requested(kwargs) -> bool:
    if "output_attentions" in kwargs:  # models that still pass the flag (GPT-J's legacy path) say it outright
        return bool(kwargs["output_attentions"])
    if _active_collector is None:
        return False
    collected = _active_collector.get()
    return collected is not None and "attentions" in collected


def _unsupported_feature(attention_mask, kwargs) -> str | None:
    """What of this call's semantics the kernels don't implement, or None."""
    if _attention_weights_requested(kwargs):
        return "output_attentions=True needs the attention weights"
    if attention_mask is not None and attention_mask.dim() != 2:
        return "a dense 4D attention mask (a custom mask or a mask overlay)"
    if kwargs.get("position_bias") is not None:
        return "an additive position bias"
    return None


def _window(sliding_window, key) -> tuple[int, int] | None:
    """The op's window for transformers' `sliding_window` W (a query sees itself and the W - 1 keys before it), or
    None where it bounds nothing: with at most W keys every query's band holds them all (transformers' flash path
    makes the same test). Decode steps over a sliding-window cache (W - 1 cached keys and the new one) are then
    plain causal calls."""
    if sliding_window is None or key.shape[2] <= sliding_window:
        return None
    return (int(sliding_window) - 1, 0)


def _original_function(impl: str, module):
    if impl == "eager":
        # The model's own eager function (GPT-J's upcasts, GPT-2's takes its scale): what transformers would pass as default.
        return getattr(sys.modules[type(module).__module__], "eager_attention_forward")
    return ALL_ATTENTION_FUNCTIONS[impl]


def _fallback_impl(original: str, attention_mask, module, sdpa_ok: bool = True) -> str:
    """The original implementation, or a dense-mask one where the original cannot take the mask we have: sdpa, or
    eager where the model class refuses sdpa (softcapping, sinks: Gemma 2, gpt-oss)."""
    dense = "sdpa" if sdpa_ok else "eager"
    if original == "eager":
        # Legacy modules (no module-level eager function) fall back to sdpa, which matches eager's math.
        return original if hasattr(sys.modules[type(module).__module__], "eager_attention_forward") else "sdpa"
    if original.startswith("flash_attention"):
        return original if attention_mask is None or _is_key_mask(attention_mask) else dense
    if original == "flex_attention" or original not in ALL_ATTENTION_FUNCTIONS:  # flex wants a BlockMask
        return dense
    if original == "sdpa":
        return dense
    return original


def _is_key_mask(attention_mask) -> bool:
    return attention_mask.dim() == 2 and attention_mask.dtype == torch.bool


def _mask_for(impl: str, attention_mask, query, key, causal: bool, window=None):
    """Turn our 2D-or-None mask (or packed segment ids) into what the original implementation expects; `window`
    the op's, which a dense mask then holds."""
    if attention_mask is not None and attention_mask.dim() == 2 and not _is_key_mask(attention_mask):
        return visibility_mask(query.shape[2], key.shape[2], causal=causal, key_padding_mask=None,
                               device=query.device, segment_ids=attention_mask, window=window)
    seqused_k = _seqused_k(attention_mask, query, key)
    if impl.startswith("flash_attention") and seqused_k is None and (attention_mask is None or attention_mask.dim() == 2):
        return attention_mask  # the sliding_window kwarg reaches it as well
    if attention_mask is None or attention_mask.dim() == 2:
        attention_mask = visibility_mask(query.shape[2], key.shape[2], causal=causal, key_padding_mask=attention_mask,
                                         device=query.device, seqused_k=seqused_k, window=window)
    if impl == "eager" and attention_mask is not None and attention_mask.dtype == torch.bool:
        # eager adds its mask to the scores
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attention_mask, torch.finfo(query.dtype).min)
    return attention_mask


# (mask, seqused_k) of the last call outside torch.compile: every layer of a forward gets the same mask object.
_LAST_SEQUSED: list = [None, None]


def _seqused_k(attention_mask, query, key) -> torch.Tensor | None:
    """Where the causal diagonal ends, for calls with fewer queries than keys and a 2D mask: one past the
    mask's last visible key (`flashpatch_mask` keeps the current step's last key visible). With a static
    cache that is the used length of the max-length buffer; computed on the device, no host sync."""
    if attention_mask is None or attention_mask.dim() != 2 or query.shape[2] >= key.shape[2]:
        return None
    compiling = torch.compiler.is_compiling()
    if not compiling and _LAST_SEQUSED[0] is attention_mask:
        return _LAST_SEQUSED[1]
    positions = torch.arange(1, attention_mask.shape[-1] + 1, device=attention_mask.device, dtype=torch.int32)
    seqused = torch.where(attention_mask, positions, 0).amax(-1).to(torch.int32)
    if not compiling:
        _LAST_SEQUSED[:] = [attention_mask, seqused]
    return seqused


def _fallback(state: PatchState | None, reason: str, module, query, key, value, attention_mask, causal, **kwargs):
    mode = state.fallback if state else "warn"
    if mode == "error":
        raise FallbackError(f"flashpatch cannot serve this attention call: {reason} (fallback='error')")
    sdpa_ok = (state.sdpa_ok if state else True) and kwargs.get("softcap") is None and kwargs.get("s_aux") is None
    impl = _fallback_impl(state.original_impl if state else "sdpa", attention_mask, module, sdpa_ok)
    if state is not None and not torch.compiler.is_compiling():  # dynamo can't trace warnings.warn (fullgraph)
        if not state.fallbacks[reason]:
            warnings.warn(f"flashpatch: {reason}; this call and others like it run {impl!r} attention instead",
                          stacklevel=3)
        state.fallbacks[reason] += 1
    mask = _mask_for(impl, attention_mask, query, key, causal, _window(kwargs.get("sliding_window"), key))
    # flash implementations take causality as a flag; the dense masks built here already hold it
    kwargs["is_causal"] = causal if impl.startswith("flash_attention") else False
    return _original_function(impl, module)(module, query, key, value, mask, **kwargs)


def flashpatch_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                 scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """AttentionInterface entry: [B, H, S, D] in, ([B, Sq, H, D], None) out, like transformers' sdpa."""
    state = STATES.get(id(getattr(module, "config", None)))
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[-1] < key.shape[2]:
        # StaticCache: buffers are max-length, only the mask's prefix holds tokens (a view, no copy).
        length = attention_mask.shape[-1]
        key, value = key[:, :, :length], value[:, :, :length]
    if scaling is None and state is not None:
        scaling = state.arch.scaling(module)

    dropout = dropout if module.training else 0.0
    reason = _unsupported_feature(attention_mask, kwargs)
    if reason is None:
        key_padding_mask = segment_ids = seqused_k = None
        if attention_mask is not None and not _is_key_mask(attention_mask):
            segment_ids = attention_mask  # from `flashpatch_mask`: a padding-free packed batch
        elif attention_mask is not None:
            key_padding_mask = attention_mask
            seqused_k = _seqused_k(key_padding_mask, query, key) if causal else None
        sinks = kwargs.get("s_aux")
        try:
            out = attention_bshd(query, key, value, causal=causal, scale=scaling, key_padding_mask=key_padding_mask,
                                 dropout_p=dropout, seqused_k=seqused_k, segment_ids=segment_ids,
                                 window=_window(kwargs.get("sliding_window"), key), softcap=kwargs.get("softcap"),
                                 sinks=sinks)
            return out, None  # [B, Sq, H, D], as transformers' sdpa returns it
        except AttentionInputError as exc:  # tensors the kernels can't take (head dim, dtype, device): by name
            reason = exc.reason
    return _fallback(state, reason, module, query, key, value, attention_mask, causal,
                     dropout=dropout, scaling=scaling, **kwargs)


def _key_mask(batch_size: int, q_length: int, kv_length: int, q_offset, attention_mask, device,
              kv_offset: int = 0) -> torch.Tensor:
    """Bool [batch, kv_length]: keys that hold tokens of this sequence, the current step's last key always
    True (it marks where the causal diagonal ends; see `_seqused_k`). Key j is the token at position
    kv_offset + j (a sliding-window cache keeps only the last tokens: kv_offset > 0). `q_offset` may be a device
    tensor (StaticCache's), so this needs no host sync and has a fixed shape step after step."""
    positions = torch.arange(kv_length, device=device) + kv_offset
    end = q_offset + q_length
    keys = positions < end
    if attention_mask is not None:
        # The 2D mask covers every token so far, or (a static sliding-window layer's) only the keys it returns.
        covers_all = attention_mask.shape[-1] >= kv_offset + kv_length
        pad = (attention_mask[:, kv_offset:kv_offset + kv_length] if covers_all else attention_mask[:, -kv_length:])
        pad = pad.to(device=device, dtype=torch.bool)
        if pad.shape[-1] < kv_length:  # a static cache's buffer is longer than the tokens seen so far
            pad = torch.cat([pad, pad.new_zeros(pad.shape[0], kv_length - pad.shape[-1])], dim=-1)
        keys = keys & pad
    return (keys | (positions == end - 1)).expand(batch_size, kv_length)


def _closure(fn, name: str, qualname: str):
    """The closure variable `name` of a transformers mask-function factory's inner function, else None."""
    if getattr(fn, "__qualname__", "") != qualname:
        return None
    cells = dict(zip(fn.__code__.co_freevars, fn.__closure__ or ()))
    return cells[name].cell_contents if name in cells else None


def _packed_segment_ids(mask_function, attention_mask, q_length: int, kv_length: int):
    """transformers describes a padding-free packed batch (position_ids restarting, no attention mask) as
    and_masks(causal, packed_sequence_mask_function(ids)), the causal part (plain or sliding-window) remapped to
    per-sequence positions in newer releases; recognise exactly that and return the ids (causal, and a window,
    within a segment are then the same as overall, positions rising by one inside each segment)."""
    if attention_mask is not None or q_length != kv_length:
        return None
    parts = _closure(mask_function, "mask_functions", "and_masks.<locals>.and_mask") or ()
    if len(parts) != 2:
        return None
    causal = parts[0]
    remapped = _closure(causal, "mask_function", "remap_positions_for_packed_sequence.<locals>.inner_mask")
    if not any(fn is masking_utils.causal_mask_function or (fn is not None and _sliding_causal(fn))
               for fn in (causal, remapped)):
        return None
    ids = _closure(parts[1], "packed_sequence_mask", "packed_sequence_mask_function.<locals>.inner_mask")
    return ids if isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[-1] == q_length else None


def _sliding_causal(mask_function) -> bool:
    """transformers' sliding-window causal mask function, and_masks(sliding_window_overlay(W), causal): the
    attention call gets W as its `sliding_window` kwarg, so the mask is the causal one's (as for flash-attention)."""
    parts = _closure(mask_function, "mask_functions", "and_masks.<locals>.and_mask") or ()
    return (len(parts) == 2 and parts[1] is masking_utils.causal_mask_function
            and getattr(parts[0], "__qualname__", "") == "sliding_window_overlay.<locals>.inner_mask")


def flashpatch_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                    mask_function=masking_utils.causal_mask_function, attention_mask=None, **kwargs):
    """AttentionMaskInterface entry: a 2D bool key mask (or None) for plain causal, sliding-window causal or
    bidirectional masks, int32 segment ids [batch, S] for transformers' padding-free packed batches (plain or
    sliding-window causal within each sequence).

    Anything else (overlays, chunked attention, custom mask functions) becomes a dense boolean mask,
    which the attention function hands to the original implementation.
    """
    args = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask)
    if mask_function is masking_utils.bidirectional_mask_function:
        return masking_utils.flash_attention_mask(**args, **kwargs)
    if mask_function is masking_utils.causal_mask_function or _sliding_causal(mask_function):
        # The keys a sliding-window cache returns are the tokens kv_offset .. kv_offset + kv_length - 1.
        preallocated = isinstance(q_offset, torch.Tensor) or q_offset + q_length != kv_offset + kv_length
        if not preallocated and (attention_mask is None or q_length == kv_length):
            return masking_utils.flash_attention_mask(**args, **kwargs)
        if not preallocated and not torch.compiler.is_compiling():
            padding = attention_mask[:, -kv_length:]
            if padding.shape[-1] == kv_length and padding.all():
                # No padding (a DynamicCache decode step's usual case): causal alone, no mask for the kernel to read.
                # One host sync per forward, as transformers' flash-attention mask has; generate syncs every step.
                return None
        device = kwargs.get("device") or (attention_mask.device if attention_mask is not None else q_offset.device)
        return _key_mask(batch_size, q_length, kv_length, q_offset, attention_mask, device, kv_offset)
    segment_ids = _packed_segment_ids(mask_function, attention_mask, q_length, kv_length)
    if segment_ids is not None:
        return segment_ids.to(torch.int32)
    kwargs["allow_is_causal_skip"] = False
    return masking_utils.sdpa_mask(**args, **kwargs)


def register() -> None:
    """Make IMPL_NAME a valid attn_implementation (idempotent)."""
    AttentionInterface.register(IMPL_NAME, flashpatch_attention_forward)
    masking_utils.AttentionMaskInterface.register(IMPL_NAME, flashpatch_mask)
