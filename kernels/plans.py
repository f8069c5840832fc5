"""The one route from a validated call to a kernel launch: which kernel serves it, the plan that launches it, and
the cache that keeps plans between calls.

A plan is a launch worked out once for everything a call signature fixes (shapes, q's strides, dtypes, flags,
tiles, key splits); its `run` binds one call's tensors, K/V strides, masks and seed. Calls repeat in kinds: a
prefill's layers share shapes outright, decode steps differ only in the cache length (a `DecodePlan` follows it).
So the first call of a kind, validated, makes the plan, and later inference calls of that kind are looked up
before any validation (`lookup`): a decode step is launch-bound, and a short prefill's attention takes less GPU
time than the general route's host work would.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch

from .autotune import AUTOTUNER, time_ms, tune_key
from .autotune import enabled as autotune_enabled
from .backward import flash_attn_backward
from .config import (SHORT_Q_BLOCK_M, TileConfig, decode_rows, decode_split_config, decode_splits, head_dim_bucket,
                     select_backward_config, select_config, select_decode_config, tune_candidates,
                     uses_decode_kernel)
from .decode import DecodePlan
from .forward import ForwardPlan
from .forward_tma import _descriptor_legal, flash_attn_forward_tma, tma_eligible
from .online_softmax import kernel_window

# "0" leaves the Gluon sm90 forward (kernels/forward_sm90.py) out of sm90 calls' autotuning candidates, so the portable
# kernels serve alone (the Gluon kernel's GPU proof: tests/test_forward_sm90.py, scripts/sm90_forward_probe.py).
GLUON_SWITCH = "FLASHPATCH_GLUON"


# "0" leaves the Gluon sm90 forward out of the candidates of softcapped calls, causal sliding windows and sinks (its
# GPU tests: tests/test_forward_sm90.py's test_softcap_*, test_causal_window_* and test_sinks_*), so the portable
# kernels serve them alone.
GLUON_FEATURES_SWITCH = "FLASHPATCH_GLUON_FEATURES"


# "0" keeps sm90 backwards on the portable kernels (kernels/backward.py) instead of the Gluon sm90 backward.
SM90_BACKWARD_SWITCH = "FLASHPATCH_SM90_BACKWARD"


def window_bounds_nothing(causal: bool, window, seq_q: int, seq_k: int) -> bool:
    """Whether a window leaves every query all the keys it would see without it (query i sees keys
    [i + Sk - Sq - left, i + Sk - Sq + right]): left >= Sk - 1, and right >= Sq - 1 unless causal. Mistral's 4096
    window on a prompt of up to 4096 tokens, say; such a call is plain attention, for every kernel."""
    band = kernel_window(causal, window)
    return band is not None and band[0] >= seq_k - 1 and (causal or band[1] >= seq_q - 1)


class PlanCache:
    """Plans by key, emptied when full: a process meets few kinds (its models' prefill and decode shapes)."""

    def __init__(self, limit: int = 256):
        self.limit, self.plans = limit, {}

    def __len__(self) -> int:
        return len(self.plans)

    def get(self, key):
        return self.plans.get(key)

    def add(self, key, plan):
        if len(self.plans) >= self.limit:
            self.plans.clear()
        self.plans[key] = plan
        return plan

    def clear(self) -> None:
        self.plans.clear()


PLANS = PlanCache()
BACKWARDS: dict[tuple, dict] = {}  # the backward kernel each kind of call got, for plans_in_use (emptied as PLANS)


@functools.lru_cache(maxsize=1024)  # a decode step asks every call: a cached answer costs a fifth of the rule's
def _decode_kernel_serves(seq_q: int, group: int, head_dim: int, element_size: int) -> bool:
    return uses_decode_kernel(seq_q, group, head_dim, 0.0, element_size)


def plan_key(q, k, v, causal, scale, key_padding_mask, seqused_k, segment_ids=None, dropout_p=0.0,
             need_lse=False, window=None, softcap=None, sinks=None) -> tuple:
    """What a plan fixes: every property of a call that validation checks, but the key length and the K/V strides
    (which grow with a cache) where the decode kernel serves; `lookup` checks those itself. The window and softcap
    as the call gives them, the sinks by dtype, shape and device (their values are bound per call)."""
    batch, heads_q, seq_q, head_dim = q.shape
    kb, kh, kn, kd = k.shape
    vb, vh, vn, vd = v.shape
    mask = None if key_padding_mask is None else (key_padding_mask.dtype, key_padding_mask.shape[0],
                                                  key_padding_mask.dim(), key_padding_mask.get_device())
    used = None if seqused_k is None else (seqused_k.dtype, seqused_k.shape, seqused_k.get_device())
    segments = None if segment_ids is None else (segment_ids.dtype, segment_ids.shape, segment_ids.get_device())
    decode = (segment_ids is None and seq_q <= SHORT_Q_BLOCK_M and kh and not dropout_p
              and _decode_kernel_serves(seq_q, heads_q // kh, head_dim, q.element_size()))
    sink = None if sinks is None else (sinks.dtype, sinks.shape, sinks.stride(), sinks.get_device())
    return (q.shape, q.stride(), q.dtype, k.dtype, v.dtype, q.get_device(), k.get_device(), v.get_device(),
            kb, kh, kd, vb, vh, vd, causal, scale, need_lse, dropout_p, mask, used, segments,
            None if decode else kn, window, softcap, sink)


def lookup(q, k, v, causal: bool, scale: float, key_padding_mask, seqused_k, window=None, softcap=None, sinks=None):
    """The plan of an inference call (no dropout, segments or lse) whose kind was validated before, or None: the
    caller then validates the call and `launch`es it (which names any problem)."""
    if not PLANS.plans:
        return None
    try:
        plan = PLANS.plans.get(plan_key(q, k, v, causal, scale, key_padding_mask, seqused_k, None, 0.0, False,
                                        window, softcap, sinks))
    except (AttributeError, TypeError, ValueError):  # malformed input
        return None
    if plan is None:
        return None
    seq_k = k.shape[2]
    if (v.shape[2] != seq_k or seq_k == 0 or (key_padding_mask is not None and key_padding_mask.shape[1] != seq_k)
            or (q.is_cuda and q.get_device() != torch._C._cuda_getDevice())):
        return None
    return plan


def launch(q, k, v, *, causal: bool, scale: float, key_padding_mask, dropout_p: float, seed: int, seqused_k,
           segment_ids, need_lse: bool, family: str | None, sm_count: int, window=None, softcap=None, sinks=None):
    """(out [B, Sq, Hq, D] (transformers' layout; `.transpose(1, 2)` is SDPA's), lse [B, Hq, Sq] or None) of a
    validated call, through its kind's plan, made on first use. window ((left, right), -1 = unbounded), softcap
    (None or 0: none) and sinks ([Hq]) as `attention` takes them."""
    key = plan_key(q, k, v, causal, scale, key_padding_mask, seqused_k, segment_ids, dropout_p, need_lse, window,
                   softcap, sinks)
    plan = PLANS.get(key)
    if plan is None:
        plan = PLANS.add(key, make_plan(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                                        dropout_p=dropout_p, seed=seed, seqused_k=seqused_k, segment_ids=segment_ids,
                                        need_lse=need_lse, family=family, sm_count=sm_count, window=window,
                                        softcap=softcap, sinks=sinks))
    return plan.run(q, k, v, key_padding_mask, seqused_k, segment_ids, seed, sinks)


class TmaPlan:
    """The tensor-descriptor (TMA) kernel for plain calls; a call of the kind whose views its descriptors can't take
    (a misaligned slice) runs the pointer kernel with the same tiles."""

    kernel = "tma"

    def __init__(self, config: TileConfig, pointer_plan: ForwardPlan, *, causal: bool, scale: float, need_lse: bool):
        self.config, self.pointer_plan = config, pointer_plan
        self.causal, self.scale, self.need_lse = causal, scale, need_lse

    def run(self, q, k, v, key_padding_mask=None, seqused_k=None, segment_ids=None, seed: int = 0, sinks=None):
        if not tma_eligible(q, k, v, plain=True):
            return self.pointer_plan.run(q, k, v)
        out, lse = flash_attn_forward_tma(q, k, v, causal=self.causal, scale=self.scale, config=self.config,
                                          warp_specialize=self.config.warp_specialize)
        return out.transpose(1, 2), (lse if self.need_lse else None)


class Sm90Plan:
    """The Gluon sm90 forward (kernels/forward_sm90.py) for the calls it takes; a call of the kind whose views its
    descriptors can't take (a misaligned slice) runs the pointer kernel with the table's tiles."""

    kernel = "gluon-sm90"

    def __init__(self, config, pointer_plan: ForwardPlan, *, causal: bool, scale: float, need_lse: bool,
                 softcap: float = 0.0, window=None):
        self.config, self.pointer_plan = config, pointer_plan
        self.causal, self.scale, self.need_lse = causal, scale, need_lse
        self.softcap, self.window = softcap, window  # window: kernel_window's band, (left, 0) or None

    def run(self, q, k, v, key_padding_mask=None, seqused_k=None, segment_ids=None, seed: int = 0, sinks=None):
        from .forward_sm90 import flash_attn_forward_sm90

        if not (_descriptor_legal(q) and _descriptor_legal(k) and _descriptor_legal(v)):
            return self.pointer_plan.run(q, k, v, key_padding_mask, seqused_k, segment_ids, seed, sinks)
        masks = {name: t for name, t in (("key_padding_mask", key_padding_mask), ("seqused_k", seqused_k),
                                         ("segment_ids", segment_ids)) if t is not None}
        out, lse = flash_attn_forward_sm90(q, k, v, causal=self.causal, scale=self.scale, need_lse=self.need_lse,
                                           config=self.config, softcap=self.softcap, window=self.window, sinks=sinks,
                                           **masks)
        return out.transpose(1, 2), lse


def sm90_refusal(family, q, k, v, *, dropout_p, key_padding_mask, seqused_k, segment_ids, window=None,
                 softcap=None, sinks=None, causal: bool = False) -> str | None:
    """Why the Gluon sm90 forward is not among this call's candidates, in a few words, or None when it is (Hopper,
    Gluon, 16-bit, its head dims, descriptor-legal views, no dropout, sliding windows only causal ones, no sliding
    window, softcapping or sinks where FLASHPATCH_GLUON_FEATURES is "0", and FLASHPATCH_GLUON not "0"). `window`
    as `kernel_window` gives it (None: bounds nothing)."""
    if family != "sm90":
        return "not a Hopper (sm90) GPU"
    features = os.environ.get(GLUON_FEATURES_SWITCH) != "0"
    causal_window = causal and window is not None and window[1] == 0
    for feature, present in (("dropout", dropout_p),
                             ("sinks", sinks is not None and not features),
                             ("a sliding window", window is not None and not (features and causal_window)),
                             ("softcapping", softcap and not features)):
        if present:
            return f"{feature} (the portable kernels serve it)"
    if os.environ.get(GLUON_SWITCH) == "0":
        return f"{GLUON_SWITCH}=0"
    from . import forward_sm90

    return forward_sm90.sm90_refusal(q, k, v, key_padding_mask=key_padding_mask, seqused_k=seqused_k,
                                     segment_ids=segment_ids)


def sm90_candidates(family, q, k, v, **call) -> list:
    """The Gluon sm90 forward's configs where it can serve this call (`sm90_refusal` is None), else none."""
    return [] if sm90_refusal(family, q, k, v, **call) is not None else _sm90_configs(q.shape[-1])


def _sm90_configs(head_dim: int) -> list:
    from .forward_sm90 import SM90_CONFIGS

    return list(SM90_CONFIGS.get(head_dim_bucket(head_dim), ()))


def call_summary(q, k, causal, key_padding_mask, seqused_k, segment_ids, band, softcap, sinks, dropout_p) -> dict:
    """A kind of call in the words `plans_in_use` reports: shape, keys, dtype, causal, masks, features."""
    return dict(q=tuple(q.shape), keys=k.shape[2], kv_heads=k.shape[1], dtype=str(q.dtype).removeprefix("torch."),
                causal=causal, masks=[name for name, t in (("key_padding_mask", key_padding_mask),
                                                          ("seqused_k", seqused_k), ("segment_ids", segment_ids))
                                      if t is not None],
                features=[name for name, on in (("window", band is not None), ("softcap", softcap),
                                                ("sinks", sinks is not None), ("dropout", dropout_p)) if on])


def make_plan(q, k, v, *, causal, scale, key_padding_mask, dropout_p, seed, seqused_k, segment_ids, need_lse, family,
              sm_count, window=None, softcap=None, sinks=None):
    """The plan for a validated call's kind: the decode kernel for few query rows, else a forward kernel with the
    tile table's row, or on a GPU the fastest of the candidates that can serve the call (the Gluon sm90 kernel's
    configs, first where it serves, then the portable kernel's tiles and the TMA kernel's), timed once per bucket
    of lengths and batch x heads (kernels/autotune.py). Calls with a window that is not causal run the portable
    kernels; causal windows, softcapping and sinks have the Gluon kernel among their candidates too, unless
    FLASHPATCH_GLUON_FEATURES=0."""
    batch, heads_q, seq_q, head_dim = q.shape
    heads_k, seq_k = k.shape[1], k.shape[2]
    element_size = q.element_size()
    decode = segment_ids is None and uses_decode_kernel(seq_q, heads_q // heads_k, head_dim, dropout_p, element_size)
    if not decode and window_bounds_nothing(causal, window, seq_q, seq_k):  # a fixed key length: plain attention
        window = None  # (a decode plan serves any cache length: it keeps its window)
    band = kernel_window(causal, window)
    softcap = float(softcap or 0.0)
    flags = dict(has_kpm=key_padding_mask is not None, has_seqused=seqused_k is not None)
    features = dict(window=window, softcap=softcap, has_sinks=sinks is not None)
    call = call_summary(q, k, causal, key_padding_mask, seqused_k, segment_ids, band, softcap, sinks, dropout_p)

    def noted(plan, why_not_gluon: str | None, **call_changes):
        plan.call, plan.why_not_gluon = dict(call, **call_changes), why_not_gluon
        return plan

    if decode:
        config = select_decode_config(family, head_dim, element_size)
        split = decode_split_config(family, head_dim, decode_rows(seq_q, heads_q // heads_k), element_size)
        tile = config.label() + (f" (split launches {split.label()})" if split else "")
        return noted(DecodePlan(q.shape, q.stride(), heads_k, q.dtype, causal=causal, scale=scale, **flags,
                                config=config, sm_count=sm_count, need_lse=need_lse, split_config=split, **features),
                     "few query rows: the decode kernel serves", keys="any",  # any cache length
                     tile=tile, tuning=None)
    plain = key_padding_mask is None and seqused_k is None and segment_ids is None and not dropout_p
    plain_scores = band is None and not softcap and sinks is None  # what the TMA and Gluon kernels compute

    def pointer_plan(config: TileConfig) -> ForwardPlan:
        return ForwardPlan(q.shape, q.stride(), k.shape, q.dtype, causal=causal, scale=scale,
                           config=dataclasses.replace(config, tma=False, warp_specialize=False), **flags,
                           has_seg=segment_ids is not None,
                           num_splits=decode_splits(batch * heads_q, seq_q, seq_k, config.block_n, sm_count),
                           dropout_p=dropout_p, need_lse=need_lse, **features)

    def plan_with(config):
        if not isinstance(config, TileConfig):  # the Gluon kernel's
            return Sm90Plan(config, pointer_plan(select_config(family, head_dim, seq_q, element_size)),
                            causal=causal, scale=scale, need_lse=need_lse, softcap=softcap, window=band)
        if config.tma:
            return TmaPlan(config, pointer_plan(config), causal=causal, scale=scale, need_lse=need_lse)
        return pointer_plan(config)

    def timed(config) -> float:
        plan = plan_with(config)
        return time_ms(lambda: plan.run(q, k, v, key_padding_mask, seqused_k, segment_ids, seed, sinks))

    untuned = ("no GPU" if family is None or not q.is_cuda else "float32" if element_size == 4
               else f"at most {SHORT_Q_BLOCK_M} query rows" if seq_q <= SHORT_Q_BLOCK_M else None)
    if untuned:
        config = select_config(family, head_dim, seq_q, element_size)
        return noted(plan_with(config), untuned, tile=config.label(), tuning=None)
    candidates = [c for c in tune_candidates(family, head_dim) if (plain and plain_scores) or not c.tma]
    refusal = sm90_refusal(family, q, k, v, dropout_p=dropout_p, key_padding_mask=key_padding_mask,
                           seqused_k=seqused_k, segment_ids=segment_ids, window=band, softcap=softcap, sinks=sinks,
                           causal=causal)
    if refusal is None:  # first: what runs untuned (FLASHPATCH_AUTOTUNE=0, CUDA graph capture) on Hopper
        candidates = _sm90_configs(head_dim) + candidates
    kind = "" if plain else "-masked"
    if not plain_scores:  # a window's band, tanh or the sink change what a tile costs: tuned apart
        kind += "-window" * (band is not None) + "-softcap" * bool(softcap) + "-sinks" * (sinks is not None)
    config, tuning = prefill_config(family, q, seq_k, causal, candidates, timed, plain, kind)
    plan = plan_with(config)
    if refusal is None and plan.kernel != Sm90Plan.kernel:  # untuned, the Gluon kernel's first config runs
        refusal = "timed slower for this bucket of lengths and batch x heads"
    return noted(plan, refusal, tile=config.label(), tuning=tuning)


def sm90_backward_refusal(family, grad_out, q, k, v, out, *, key_padding_mask, dropout_p, segment_ids, window,
                          softcap, sinks) -> str | None:
    """Why the Gluon sm90 backward (kernels/backward_sm90.py) does not serve this backward, in a few words, or None
    when it does: Hopper, Gluon, 16-bit, head dim 64/80/96/128, descriptor-legal views, no dropout, window,
    softcapping or sinks (key padding masks and segment ids it takes), deterministic algorithms off (its dQ adds
    land in any order), and FLASHPATCH_SM90_BACKWARD not "0"."""
    if family != "sm90":
        return "not a Hopper (sm90) GPU"
    for feature, present in (("dropout", dropout_p), ("a sliding window", window is not None),
                             ("softcapping", softcap), ("sinks", sinks is not None)):
        if present:
            return f"{feature} (the portable backward serves it)"
    if os.environ.get(SM90_BACKWARD_SWITCH) == "0":
        return f"{SM90_BACKWARD_SWITCH}=0"
    if torch.are_deterministic_algorithms_enabled():
        return "deterministic algorithms requested (its dQ adds land in any order)"
    from . import backward_sm90

    if not backward_sm90.HAS_GLUON:
        return "this Triton has no Gluon"
    if not backward_sm90.sm90_backward_eligible(grad_out, q, k, v, out):
        return "dtype, head dim or strides (16-bit, head dim 64/80/96/128, TMA-legal views)"
    return None


def backward(grad_out, q, k, v, out, lse, *, causal, scale, family, key_padding_mask=None, dropout_p=0.0, seed=0,
             segment_ids=None, window=None, softcap=None, sinks=None):
    """(dq, dk, dv, dsinks or None) for a forward's (out, lse): the Gluon sm90 backward where it serves the call
    (`sm90_backward_refusal` is None), else the portable backward with the tile table's row. Each kind of call's
    choice is listed by `plans_in_use`. A window that bounds nothing (`window_bounds_nothing`) is dropped."""
    if window is not None and window_bounds_nothing(causal, window, q.shape[2], k.shape[2]):
        window = None
    refusal = sm90_backward_refusal(family, grad_out, q, k, v, out, key_padding_mask=key_padding_mask,
                                    dropout_p=dropout_p, segment_ids=segment_ids, window=window, softcap=softcap,
                                    sinks=sinks)
    kind = (tuple(q.shape), tuple(k.shape), q.dtype, causal, key_padding_mask is None, segment_ids is None, window,
            bool(softcap), sinks is None, bool(dropout_p), refusal)
    if kind not in BACKWARDS:  # described once per kind: a training step asks every layer
        if len(BACKWARDS) >= PLANS.limit:
            BACKWARDS.clear()
        call = call_summary(q, k, causal, key_padding_mask, None, segment_ids, kernel_window(causal, window),
                            softcap, sinks, dropout_p)
        BACKWARDS[kind] = dict(call, kernel="portable-backward" if refusal else "gluon-sm90-backward",
                               why_not_gluon=refusal)
    if refusal is None:
        from .backward_sm90 import flash_attn_backward_sm90

        return (*flash_attn_backward_sm90(grad_out, q, k, v, out, lse, causal=causal, scale=scale,
                                          key_padding_mask=key_padding_mask, segment_ids=segment_ids), None)
    config = select_backward_config(family, q.shape[-1], q.element_size())
    return flash_attn_backward(grad_out, q, k, v, out, lse, causal=causal, scale=scale,
                               key_padding_mask=key_padding_mask, config=config, dropout_p=dropout_p, seed=seed,
                               segment_ids=segment_ids, window=window, softcap=float(softcap or 0.0), sinks=sinks)


def plans_in_use() -> list[dict]:
    """The kinds of call this process has planned: each call's shape, dtype, masks and features, the kernel that
    serves it and, where that is not a Gluon sm90 kernel, why; for forward plans also the tile config (`tile`) and
    how it was chosen (`tuning`: the autotune bucket and, where this process timed them, every candidate's ms; None
    where nothing was tuned). Forward plans first, then the backwards run."""
    return [dict(plan.call, kernel=plan.kernel, why_not_gluon=plan.why_not_gluon) for plan in PLANS.plans.values()
            if hasattr(plan, "call")] + list(BACKWARDS.values())


def prefill_config(family: str, q, seq_k: int, causal: bool, candidates: list, timed, plain: bool,
                   kind: str | None = None):
    """The first candidate (on Hopper the Gluon kernel's default, else the table's row) while a CUDA graph is being
    captured (nothing can be timed), else the autotuned choice for this bucket of lengths and batch x heads
    (`timed(config)` -> ms), remembered on disk.
    `kind`: the key's suffix ("" for plain calls, "-masked" for others unless given). Returns (config, how it was
    chosen: the autotuner's `describe`, or None where nothing was tuned)."""
    if torch.cuda.is_current_stream_capturing():
        return candidates[0], None
    key = tune_key(head_dim_bucket(q.shape[-1]), str(q.dtype).removeprefix("torch."), causal, q.shape[2], seq_k,
                   q.shape[0] * q.shape[1])
    if kind is None:
        kind = "" if plain else "-masked"
    config = AUTOTUNER.pick(family, key + kind, candidates, timed)
    return config, (AUTOTUNER.describe(family, key + kind) if autotune_enabled() and len(candidates) > 1 else None)


def reset() -> None:
    """Forget every plan and tile choice held in memory (tests; a changed FLASHPATH_AUTOTUNE or FLASHPATCH_TMA)."""
    PLANS.clear()
    BACKWARDS.clear()
    AUTOTUNER.choices.clear()
    AUTOTUNER.timings.clear()
