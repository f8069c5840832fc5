"""`flashpatch.attention`: the op in SDPA's layout, validated, over the Triton kernels."""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch

from .dispatch import path_for_device
from .reference import reference_attention

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


class AttentionInputError(ValueError):
    """Input the kernels cannot serve; the message names the problem and what to do."""


def _check_inputs(q, k, v, key_padding_mask, seqused_k=None, segment_ids=None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise AttentionInputError(f"{name} must be a 4-D tensor [batch, heads, seq, head_dim], got "
                                      f"{getattr(t, 'shape', type(t).__name__)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise AttentionInputError(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}): cast them to one dtype")
    if q.dtype not in SUPPORTED_DTYPES:
        raise AttentionInputError(f"dtype {q.dtype} is not supported: use float16, bfloat16 or float32")
    if not (q.device == k.device == v.device):
        raise AttentionInputError(f"q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    (b, hq, _, d), (bk, hk, sk, dk) = q.shape, k.shape
    if k.shape != v.shape:
        raise AttentionInputError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if bk != b or dk != d:
        raise AttentionInputError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim")
    if hk == 0 or hq % hk != 0:
        raise AttentionInputError(f"query heads ({hq}) must be a multiple of key/value heads ({hk}) for GQA/MQA")
    if d % 8 != 0 or not 8 <= d <= MAX_HEAD_DIM:
        raise AttentionInputError(f"head_dim {d} is not supported: multiples of 8 from 8 to {MAX_HEAD_DIM}; "
                                  "use torch.nn.functional.scaled_dot_product_attention for others")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (b, sk):
            raise AttentionInputError(f"key_padding_mask must be bool [batch, Sk] = [{b}, {sk}] (True = attend), got "
                                      f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise AttentionInputError(f"key_padding_mask is on {key_padding_mask.device}, q on {q.device}")
    if seqused_k is not None:
        if seqused_k.dtype != torch.int32 or tuple(seqused_k.shape) != (b,) or seqused_k.device != q.device:
            raise AttentionInputError(f"seqused_k must be an int32 tensor [batch] = [{b}] on {q.device}, got "
                                      f"{seqused_k.dtype} {tuple(seqused_k.shape)} on {seqused_k.device}")
    if segment_ids is not None:
        sq = q.shape[2]
        if (segment_ids.dtype not in (torch.int32, torch.int64) or tuple(segment_ids.shape) != (b, sq) or sq != sk
                or segment_ids.device != q.device):
            raise AttentionInputError(f"segment_ids must be an integer tensor [batch, S] = [{b}, {sq}] on {q.device} "
                                      f"with Sq == Sk (packed sequences), got {segment_ids.dtype} "
                                      f"{tuple(segment_ids.shape)} on {segment_ids.device} for Sk = {sk}")
        if seqused_k is not None:
            raise AttentionInputError("segment_ids (packed training batches) and seqused_k (KV caches) don't combine")


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    from flashpatch.kernels import INTERPRETER_SM_COUNT

    if device.type != "cuda":
        return INTERPRETER_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


_KERNELS = None


def _kernels():
    """flashpatch.kernels, imported on first use (TRITON_INTERPRET must be set before it is imported)."""
    global _KERNELS
    if _KERNELS is None:
        import flashpatch.kernels

        _KERNELS = flashpatch.kernels
    return _KERNELS


# CUDA device index -> (kernel path, SM count): every call asks, and building q.device costs more than this lookup.
_CUDA_DEVICES: dict = {}


def _device_info(q: torch.Tensor):
    if not q.is_cuda:
        return path_for_device(q.device), _sm_count(q.device), -1
    index = q.get_device()
    info = _CUDA_DEVICES.get(index)
    if info is None:
        info = _CUDA_DEVICES[index] = (path_for_device(q.device), _sm_count(q.device), index)
    return info


def _forward(q, k, v, causal, scale, key_padding_mask, dropout_p=0.0, seed=0, seqused_k=None, segment_ids=None,
             need_lse=True):
    path, sm_count, index = _device_info(q)
    if not path.usable:
        raise AttentionInputError(f"flashpatch kernels cannot run here: {path.reason}. Use "
                                  "torch.nn.functional.scaled_dot_product_attention, or set TRITON_INTERPRET=1 "
                                  "before importing flashpatch to run the kernels on CPU tensors")
    with _device_guard(index):
        return _forward_on_device(q, k, v, causal, scale, key_padding_mask, dropout_p, seed, seqused_k, segment_ids,
                                  need_lse, path.family, sm_count)


def _device_guard(index: int):
    """Kernels launch on the current device: make it q's for the call when it isn't already."""
    if index >= 0 and index != torch.cuda.current_device():
        return torch.cuda.device(index)
    return contextlib.nullcontext()


# Inference calls repeat, every layer of every step, one kind: decode calls the same shapes but for a key length
# that grows, a prefill's layers the same shapes outright. The first call of a kind (validated, tiles chosen) leaves
# a plan (kernels.DecodePlan, kernels.ForwardPlan), keyed by everything the plan fixes; later inference calls of that
# kind go straight to it (`planned_forward`): decode is launch-bound, and a short prefill's attention takes less
# time on the GPU than the general path's host work did.
_PLANS: dict = {}
MAX_PLANS = 256


def _plan_key(q, k, v, causal, scale, key_padding_mask, seqused_k, need_lse) -> tuple:
    """What a plan fixes: everything `_check_inputs` validates but the key length (and the strides that grow
    with it), which `planned_forward` checks itself. A prefill plan (more than SHORT_Q_BLOCK_M queries) also fixes
    the key length: its tiles are chosen per length."""
    kb, kh, kn, kd = k.shape
    vb, vh, vn, vd = v.shape
    mask = None if key_padding_mask is None else (key_padding_mask.dtype, key_padding_mask.shape[0],
                                                  key_padding_mask.dim(), key_padding_mask.get_device())
    used = None if seqused_k is None else (seqused_k.dtype, seqused_k.shape, seqused_k.get_device())
    return (q.shape, q.stride(), q.dtype, k.dtype, v.dtype, q.get_device(), k.get_device(), v.get_device(),
            kb, kh, kd, vb, vh, vd, causal, scale, need_lse, mask, used,
            kn if q.shape[2] > _kernels().SHORT_Q_BLOCK_M else None)


def _plan_for(key, make):
    """The plan held for `key`, else `make()`'s, remembered."""
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = make()
    return plan


def planned_forward(q, k, v, causal, scale, key_padding_mask, seqused_k, bshd: bool = False):
    """An inference call outside torch.compile whose kind has a plan, run by it; None for any other call,
    which then takes the general path (and gets its errors). bshd: return [B, Sq, Hq, D] (transformers' layout)."""
    # is_compiling first: a traced call must not read _PLANS (dynamo would guard on it and recompile)
    if (torch.compiler.is_compiling() or not _PLANS or not isinstance(q, torch.Tensor)
            or not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor) or q.dim() != 4
            or torch.is_autocast_enabled("cuda" if q.is_cuda else "cpu")
            or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))):
        return None
    if scale is None:
        scale = q.shape[-1] ** -0.5
    try:
        plan = _PLANS.get(_plan_key(q, k, v, causal, float(scale), key_padding_mask, seqused_k, False))
    except (AttributeError, TypeError, ValueError):  # malformed input: the general path names the problem
        return None
    seq_k = k.shape[2]
    if (plan is None or v.shape[2] != seq_k or seq_k == 0
            or (key_padding_mask is not None and key_padding_mask.shape[1] != seq_k)
            or (q.is_cuda and q.get_device() != torch._C._cuda_getDevice())):
        return None
    out = plan.run(q, k, v, key_padding_mask, seqused_k)[0]
    return out if bshd else out.transpose(1, 2)


def _forward_on_device(q, k, v, causal, scale, key_padding_mask, dropout_p, seed, seqused_k, segment_ids, need_lse,
                       family, sm_count):
    kernels = _kernels()
    batch, heads_q, seq_q, head_dim = q.shape
    heads_k, seq_k = k.shape[1], k.shape[2]
    element_size = q.element_size()
    if segment_ids is None and kernels.uses_decode_kernel(seq_q, heads_q // heads_k, head_dim, dropout_p, element_size):
        key = _plan_key(q, k, v, causal, scale, key_padding_mask, seqused_k, need_lse)
        plan = _plan_for(key, lambda: kernels.DecodePlan(
            q.shape, q.stride(), heads_k, q.dtype, causal=causal, scale=scale,
            has_kpm=key_padding_mask is not None, has_seqused=seqused_k is not None,
            config=kernels.select_decode_config(family, head_dim, element_size), sm_count=sm_count,
            need_lse=need_lse, split_warps=kernels.decode_split_warps(family, head_dim, element_size)))
        out, lse = plan.run(q, k, v, key_padding_mask, seqused_k)
        return out.transpose(1, 2), lse

    def launch(config):
        splits = kernels.decode_splits(batch * heads_q, seq_q, seq_k, config.block_n, sm_count)
        return kernels.flash_attn_forward(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                                          config=config, seqused_k=seqused_k, segment_ids=segment_ids,
                                          num_splits=splits, dropout_p=dropout_p, seed=seed, need_lse=need_lse)

    config = _prefill_config(family, q, seq_k, causal, launch)
    plain = key_padding_mask is None and seqused_k is None
    if (need_lse or dropout_p or segment_ids is not None or seq_q <= kernels.SHORT_Q_BLOCK_M
            or kernels.uses_tma(config, q, k, v, plain=plain)):
        return launch(config)
    # Held already where the planned lookup declined this call (autocast casts first), made once otherwise.
    key = _plan_key(q, k, v, causal, scale, key_padding_mask, seqused_k, need_lse)
    plan = _plan_for(key, lambda: kernels.ForwardPlan(
        q.shape, q.stride(), k.shape, q.dtype, causal=causal, scale=scale, config=config,
        has_kpm=key_padding_mask is not None, has_seqused=seqused_k is not None, need_lse=False))
    out, lse = plan.run(q, k, v, key_padding_mask, seqused_k)
    return out.transpose(1, 2), lse


def _time_ms(launch, config) -> float:
    """Median of three CUDA-event timings of one launch, after a warm-up (which also compiles)."""
    launch(config)
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launch(config)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[1]


# (family, head dim, dtype, causal, seq_q, seq_k, the autotune and TMA switches) -> the tile `_prefill_config` chose:
# working the choice out (bucketed tune key, candidate list, the tuner's table) took ~20 us of a prefill call's
# ~130 us of host time on the H100's host (docs/gpu-runs/2026-11-25-session7/f/).
_PREFILL_CONFIGS: dict = {}
MAX_PREFILL_CONFIGS = 4096


def _prefill_config(family, q, seq_k, causal, launch):
    """The tile table's row, or on a GPU the autotuned choice among its candidates (kernels/autotune.py)."""
    kernels = _kernels()
    head_dim, seq_q = q.shape[-1], q.shape[2]
    if (family is None or seq_q <= kernels.SHORT_Q_BLOCK_M or not q.is_cuda or q.element_size() == 4
            or torch.cuda.is_current_stream_capturing()):
        return kernels.select_config(family, head_dim, seq_q, q.element_size())
    memo = (family, head_dim, q.dtype, causal, seq_q, seq_k, os.environ.get(kernels.autotune.ENV_SWITCH),
            os.environ.get(kernels.config.TMA_SWITCH))
    config = _PREFILL_CONFIGS.get(memo)
    if config is None:
        key = kernels.tune_key(kernels.head_dim_bucket(head_dim), str(q.dtype).removeprefix("torch."), causal,
                               seq_q, seq_k)
        config = kernels.AUTOTUNER.pick(family, key, kernels.tune_candidates(family, head_dim),
                                        lambda cfg: _time_ms(launch, cfg))
        if len(_PREFILL_CONFIGS) >= MAX_PREFILL_CONFIGS:
            _PREFILL_CONFIGS.clear()
        _PREFILL_CONFIGS[memo] = config
    return config


def _backward(grad_out, q, k, v, out, lse, causal, scale, key_padding_mask, dropout_p, seed, segment_ids=None):
    kernels = _kernels()
    path, _, index = _device_info(q)
    config = kernels.select_backward_config(path.family, q.shape[-1], q.element_size())
    with _device_guard(index):
        return kernels.flash_attn_backward(grad_out, q, k, v, out, lse, causal=causal, scale=scale,
                                   key_padding_mask=key_padding_mask, config=config, dropout_p=dropout_p, seed=seed,
                                   segment_ids=segment_ids)


def _reference_backward(grad_out, q, k, v, causal, scale, key_padding_mask, segment_ids=None):
    """PyTorch recomputation in float32 (O(Sq * Sk) memory): the named fallback of the Triton backward."""
    with torch.enable_grad():
        leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
        out = reference_attention(*leaves, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                                  segment_ids=segment_ids)
        grads = torch.autograd.grad(out, leaves, grad_out.float())
    return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))


# The op as PyTorch custom ops with fake (meta) implementations and registered autograd, so that
# torch.compile traces through it without graph breaks (fullgraph=True included).
@torch.library.custom_op("flashpatch::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                   key_padding_mask: torch.Tensor | None, dropout_p: float, seed: int,
                   seqused_k: torch.Tensor | None = None,
                   segment_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, causal, scale, key_padding_mask, dropout_p, seed, seqused_k, segment_ids)


@_attention_fwd.register_fake
def _(q, k, v, causal, scale, key_padding_mask, dropout_p, seed, seqused_k=None, segment_ids=None):
    batch, heads, seq_q, head_dim = q.shape
    out = q.new_empty((batch, seq_q, heads, head_dim)).transpose(1, 2)
    return out, q.new_empty((batch, heads, seq_q), dtype=torch.float32)


def _backward_or_fallback(grad_out, q, k, v, out, lse, causal, scale, key_padding_mask, dropout_p, seed,
                          segment_ids=None):
    args = (causal, scale, key_padding_mask)
    try:
        return _backward(grad_out, q, k, v, out, lse, *args, dropout_p, seed, segment_ids)
    except Exception as exc:  # a GPU whose resources the tiles exceed: compile errors, not wrong numbers
        resources = "OutOfResources" in type(exc).__name__ or "CompilationError" in type(exc).__name__
        if not resources or dropout_p > 0:  # PyTorch cannot regenerate the kernels' dropout mask
            raise
        warnings.warn(f"flashpatch: Triton backward unavailable here ({type(exc).__name__}); "
                      "recomputing the gradient with PyTorch ops (O(Sq*Sk) memory)", stacklevel=2)
        return _reference_backward(grad_out, q, k, v, *args, segment_ids)


@torch.library.custom_op("flashpatch::attention_bwd", mutates_args=())
def _attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, causal: bool, scale: float, key_padding_mask: torch.Tensor | None,
                   dropout_p: float, seed: int,
                   segment_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_or_fallback(grad_out, q, k, v, out, lse, causal, scale, key_padding_mask, dropout_p, seed,
                                 segment_ids)


@_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, causal, scale, key_padding_mask, dropout_p, seed, segment_ids=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, key_padding_mask, dropout_p, seed, _seqused_k, segment_ids = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], key_padding_mask, segment_ids)
    ctx.causal, ctx.scale, ctx.dropout_p, ctx.seed = causal, scale, dropout_p, seed


def _autograd_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, key_padding_mask, segment_ids = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(grad_out, q, k, v, out, lse, ctx.causal, ctx.scale, key_padding_mask,
                                ctx.dropout_p, ctx.seed, segment_ids)
    return dq, dk, dv, None, None, None, None, None, None, None


_attention_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The same forward and backward as the custom ops, for eager training: an autograd.Function skips the
    dispatcher's per-call work (about as much host time as a small layer's attention takes on the GPU)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, key_padding_mask, dropout_p, seed, segment_ids):
        out, lse = _forward(q, k, v, causal, scale, key_padding_mask, dropout_p, seed, None, segment_ids)
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, segment_ids)
        ctx.causal, ctx.scale, ctx.dropout_p, ctx.seed = causal, scale, dropout_p, seed
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():  # create_graph=True: the Triton backward has no derivative of its own
            raise RuntimeError("flashpatch.attention has no double backward (create_graph=True); for higher-order "
                               "gradients use torch.nn.functional.scaled_dot_product_attention's math backend")
        q, k, v, out, lse, key_padding_mask, segment_ids = ctx.saved_tensors
        dq, dk, dv = _backward_or_fallback(grad_out, q, k, v, out, lse, ctx.causal, ctx.scale, key_padding_mask,
                                           ctx.dropout_p, ctx.seed, segment_ids)
        return dq, dk, dv, None, None, None, None, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, scale: float | None = None,
              key_padding_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
              seed: int | None = None, seqused_k: torch.Tensor | None = None,
              segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Flash attention in `F.scaled_dot_product_attention`'s layout.

    q: [batch, Hq, Sq, D]; k, v: [batch, Hkv, Sk, D] with Hq a multiple of Hkv (GQA/MQA, no copy).
    causal: query i sees keys j <= i + Sk - Sq (bottom-right, as with a KV cache).
    key_padding_mask: bool [batch, Sk], True = attend. A query that sees no key returns zeros.
    D: a multiple of 8 up to 256. Any strides. float16/bfloat16 dots run on tensor cores with
    float32 accumulation; float32 inputs use exact IEEE float32 dots (no TF32).
    dropout_p: attention dropout inside the kernels (a Philox mask from `seed`, drawn from torch's CPU
    generator when None, so torch.manual_seed makes runs repeatable; the backward regenerates it).
    seqused_k: int32 [batch] on the device, for a preallocated (static) KV cache: keys at index >= seqused_k[b]
    are ignored and causal alignment is to seqused_k[b] instead of Sk. Read on the device: no host sync, so a
    decode step can be captured in a CUDA graph. Inference only (no backward).
    segment_ids: integer [batch, S] with Sq == Sk: a padding-free packed batch; a query attends only to keys
    with its own segment id (with causal, causally within its sequence). Forward and backward.
    Few query tokens (<= 16) go to a flash-decoding kernel that splits the cache across programs and reads
    each K/V byte once per GQA group.
    Under autocast, q, k and v are cast to the autocast dtype first, as SDPA does (a Llama under bf16 autocast
    with float32 weights hands over float32 q and k after RoPE but a bfloat16 v).
    Returns [batch, Hq, Sq, D] (memory laid out as [batch, Sq, Hq, D]).
    """
    if not dropout_p and segment_ids is None:
        out = planned_forward(q, k, v, causal, scale, key_padding_mask, seqused_k)
        if out is not None:
            return out
    if isinstance(q, torch.Tensor) and torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in (q, k, v))
    _check_inputs(q, k, v, key_padding_mask, seqused_k, segment_ids)
    if segment_ids is not None:
        segment_ids = segment_ids.to(torch.int32).contiguous()
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise AttentionInputError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if seqused_k is not None and (dropout_p or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))):
        raise AttentionInputError("seqused_k is for inference over a KV cache (no dropout, no backward); to train, "
                                  "slice the keys to length and pass key_padding_mask")
    if dropout_p and q.shape[2] * k.shape[2] >= 2**31:
        raise AttentionInputError("dropout needs Sq * Sk < 2**31 (the mask's per-head counter is 32-bit)")
    if seed is None:
        seed = int(torch.randint(0, 2**30, (1,)).item()) if dropout_p else 0  # + head index stays in int32
    if q.shape[2] == 0 or k.shape[2] == 0:
        return torch.zeros_like(q)
    if torch.compiler.is_compiling():
        return _attention_fwd(q, k, v, causal, scale, key_padding_mask, dropout_p, seed, seqused_k, segment_ids)[0]
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _EagerAttention.apply(q, k, v, causal, scale, key_padding_mask, dropout_p, seed, segment_ids)
    # Inference outside torch.compile: skip the dispatcher's per-call cost (decode is launch-bound).
    return _forward(q, k, v, causal, scale, key_padding_mask, dropout_p, seed, seqused_k, segment_ids, need_lse=False)[0]
