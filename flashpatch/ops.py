"""`flashpatch.attention`: the op in SDPA's layout, validated, over the Triton kernels."""

from __future__ import annotations

import warnings

import torch

from . import dispatch
from .dispatch import device_guard, device_info, kernels
from .reference import reference_attention

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


class AttentionInputError(ValueError):
    """Input the kernels cannot serve; the message names the problem and what to do, `reason` the problem alone
    (what a patched model's fallback is counted under)."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


def head_dim_problem(head_dim: int) -> str | None:
    """Why the kernels can't take this head dim, or None: they serve multiples of 8 up to 256."""
    if head_dim % 8 or not 8 <= head_dim <= MAX_HEAD_DIM:
        return f"head_dim {head_dim}: the kernels serve multiples of 8 up to {MAX_HEAD_DIM}"
    return None


def check_inputs(q, k, v, key_padding_mask, seqused_k=None, segment_ids=None, window=None, softcap=None,
                 sinks=None) -> None:
    """AttentionInputError naming the first thing about these inputs the kernels can't take."""
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
    problem = head_dim_problem(d)
    if problem is not None:
        raise AttentionInputError(f"{problem}; use torch.nn.functional.scaled_dot_product_attention for others",
                                  reason=problem)
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
    if window is not None and not (isinstance(window, (tuple, list)) and len(window) == 2
                                   and all(isinstance(w, int) and not isinstance(w, bool) and w >= -1
                                           for w in window)):
        raise AttentionInputError(f"window must be (left, right), ints >= -1 (-1: no bound on that side), got "
                                  f"{window!r}")
    if softcap is not None and (isinstance(softcap, (bool, torch.Tensor)) or not isinstance(softcap, (int, float))
                                or not softcap >= 0 or softcap == float("inf")):
        raise AttentionInputError(f"softcap must be a finite float > 0 (0 or None: no softcapping), got {softcap!r}")
    if sinks is not None:
        if (not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point() or sinks.dim() != 1
                or sinks.shape[0] != q.shape[1] or sinks.device != q.device):
            raise AttentionInputError(f"sinks must be a floating-point tensor [Hq] = [{q.shape[1]}] on {q.device}, got "
                                      f"{getattr(sinks, 'dtype', type(sinks).__name__)} "
                                      f"{tuple(getattr(sinks, 'shape', ()))} on {getattr(sinks, 'device', None)}")


def _launch(q, k, v, causal, scale, key_padding_mask, dropout_p=0.0, seed=0, seqused_k=None, segment_ids=None,
            need_lse=True, window=None, softcap=None, sinks=None):
    """(out [B, Sq, Hq, D], lse or None) of a validated call, on its device's kernels (kernels/plans.py)."""
    path, sm_count, index = device_info(q)
    if not path.usable:
        raise AttentionInputError(f"flashpatch kernels cannot run here: {path.reason}. Use "
                                  "torch.nn.functional.scaled_dot_product_attention, or set TRITON_INTERPRET=1 "
                                  "before importing flashpatch to run the kernels on CPU tensors", reason=path.reason)
    with device_guard(index):
        return kernels().plans.launch(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                                      dropout_p=dropout_p, seed=seed, seqused_k=seqused_k, segment_ids=segment_ids,
                                      need_lse=need_lse, family=path.family, sm_count=sm_count, window=window,
                                      softcap=softcap, sinks=sinks)


def _forward(q, k, v, causal, scale, key_padding_mask, dropout_p=0.0, seed=0, seqused_k=None, segment_ids=None,
             window=None, softcap=None, sinks=None):
    """`_launch` with out in SDPA's layout and the lse, for the autograd paths."""
    out, lse = _launch(q, k, v, causal, scale, key_padding_mask, dropout_p, seed, seqused_k, segment_ids, True,
                       window, softcap, sinks)
    return out.transpose(1, 2), lse


def _window_args(window) -> tuple[int, int]:
    """A window as the custom ops' two ints (-1, -1: none)."""
    return (-1, -1) if window is None else (int(window[0]), int(window[1]))


def _window_of(left: int, right: int):
    return None if left == -1 and right == -1 else (left, right)


def kernels_used() -> list[dict]:
    """What served this process's attention calls, one entry per kind of call (shape, dtype, causal, masks, features):
    `kernel` ("gluon-sm90", "portable", "tma" or "decode" for forwards, then "gluon-sm90-backward" or
    "portable-backward" for the backwards run) and `why_not_gluon`, the reason the Gluon sm90 kernel did not serve
    it (None where it did). Calls of a kind not seen yet, or after `reset_caches`, are not listed."""
    return kernels().plans.plans_in_use()


def reset_caches() -> None:
    """Forget what earlier calls left in memory: launch plans, tile choices, devices (for tests)."""
    kernels().plans.reset()
    dispatch.reset()


def _backward(grad_out, q, k, v, out, lse, causal, scale, key_padding_mask, dropout_p, seed, segment_ids=None,
              window=None, softcap=None, sinks=None):
    """(dq, dk, dv, dsinks or None) from the Triton backward the route picks for the device (kernels/plans.py)."""
    path, _, index = device_info(q)
    with device_guard(index):
        dq, dk, dv, dsinks = kernels().plans.backward(
            grad_out, q, k, v, out, lse, causal=causal, scale=scale, family=path.family,
            key_padding_mask=key_padding_mask, dropout_p=dropout_p, seed=seed, segment_ids=segment_ids,
            window=window, softcap=softcap, sinks=sinks)
    return dq, dk, dv, (None if dsinks is None else dsinks.to(sinks.dtype))


def _reference_backward(grad_out, q, k, v, causal, scale, key_padding_mask, segment_ids=None, window=None,
                        softcap=None, sinks=None):
    """PyTorch recomputation in float32 (O(Sq * Sk) memory): the named fallback of the Triton backward."""
    with torch.enable_grad():
        tensors = (q, k, v) if sinks is None else (q, k, v, sinks)
        leaves = [t.detach().float().requires_grad_() for t in tensors]
        out = reference_attention(*leaves[:3], causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                                  segment_ids=segment_ids, window=window, softcap=softcap,
                                  sinks=None if sinks is None else leaves[3])
        grads = torch.autograd.grad(out, leaves, grad_out.float())
    grads = tuple(g.to(t.dtype) for g, t in zip(grads, tensors))
    return grads if sinks is not None else (*grads, None)


# The op as PyTorch custom ops with fake (meta) implementations and registered autograd, so that
# torch.compile traces through it without graph breaks (fullgraph=True included). The window travels as two ints
# (-1, -1: none), softcap as a float (0.0: none).
@torch.library.custom_op("flashpatch::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                   key_padding_mask: torch.Tensor | None, dropout_p: float, seed: int,
                   seqused_k: torch.Tensor | None = None,
                   segment_ids: torch.Tensor | None = None, window_left: int = -1, window_right: int = -1,
                   softcap: float = 0.0, sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, causal, scale, key_padding_mask, dropout_p, seed, seqused_k, segment_ids,
                    _window_of(window_left, window_right), softcap or None, sinks)


@_attention_fwd.register_fake
def _(q, k, v, causal, scale, key_padding_mask, dropout_p, seed, seqused_k=None, segment_ids=None, window_left=-1,
      window_right=-1, softcap=0.0, sinks=None):
    batch, heads, seq_q, head_dim = q.shape
    out = q.new_empty((batch, seq_q, heads, head_dim)).transpose(1, 2)
    return out, q.new_empty((batch, heads, seq_q), dtype=torch.float32)


def _backward_or_fallback(grad_out, q, k, v, out, lse, causal, scale, key_padding_mask, dropout_p, seed,
                          segment_ids=None, window=None, softcap=None, sinks=None):
    """(dq, dk, dv, dsinks or None)."""
    args = (causal, scale, key_padding_mask)
    features = dict(window=window, softcap=softcap, sinks=sinks)
    try:
        return _backward(grad_out, q, k, v, out, lse, *args, dropout_p, seed, segment_ids, **features)
    except Exception as exc:  # a GPU whose resources the tiles exceed: compile errors, not wrong numbers
        resources = "OutOfResources" in type(exc).__name__ or "CompilationError" in type(exc).__name__
        if not resources or dropout_p > 0:  # PyTorch cannot regenerate the kernels' dropout mask
            raise
        warnings.warn(f"flashpatch: Triton backward unavailable here ({type(exc).__name__}); "
                      "recomputing the gradient with PyTorch ops (O(Sq*Sk) memory)", stacklevel=2)
        return _reference_backward(grad_out, q, k, v, *args, segment_ids, **features)


@torch.library.custom_op("flashpatch::attention_bwd", mutates_args=())
def _attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, causal: bool, scale: float, key_padding_mask: torch.Tensor | None,
                   dropout_p: float, seed: int,
                   segment_ids: torch.Tensor | None = None, window_left: int = -1, window_right: int = -1,
                   softcap: float = 0.0, sinks: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dsinks); dsinks is empty without sinks (a custom op returns tensors only)."""
    dq, dk, dv, dsinks = _backward_or_fallback(grad_out, q, k, v, out, lse, causal, scale, key_padding_mask,
                                               dropout_p, seed, segment_ids, _window_of(window_left, window_right),
                                               softcap or None, sinks)
    return dq, dk, dv, (q.new_empty(0) if dsinks is None else dsinks)


@_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, causal, scale, key_padding_mask, dropout_p, seed, segment_ids=None,
      window_left=-1, window_right=-1, softcap=0.0, sinks=None):
    dsinks = q.new_empty(0) if sinks is None else torch.empty_like(sinks)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dsinks


def _setup_context(ctx, inputs, output):
    (q, k, v, causal, scale, key_padding_mask, dropout_p, seed, _seqused_k, segment_ids, window_left, window_right,
     softcap, sinks) = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], key_padding_mask, segment_ids, sinks)
    ctx.causal, ctx.scale, ctx.dropout_p, ctx.seed = causal, scale, dropout_p, seed
    ctx.window, ctx.softcap = (window_left, window_right), softcap


def _autograd_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, key_padding_mask, segment_ids, sinks = ctx.saved_tensors
    dq, dk, dv, dsinks = _attention_bwd(grad_out, q, k, v, out, lse, ctx.causal, ctx.scale, key_padding_mask,
                                        ctx.dropout_p, ctx.seed, segment_ids, *ctx.window, ctx.softcap, sinks)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, (None if sinks is None else dsinks)


_attention_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The same forward and backward as the custom ops, for eager training: an autograd.Function skips the
    dispatcher's per-call work (about as much host time as a small layer's attention takes on the GPU)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, key_padding_mask, dropout_p, seed, segment_ids, window, softcap, sinks):
        out, lse = _forward(q, k, v, causal, scale, key_padding_mask, dropout_p, seed, None, segment_ids, window,
                            softcap, sinks)
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, segment_ids, sinks)
        ctx.causal, ctx.scale, ctx.dropout_p, ctx.seed = causal, scale, dropout_p, seed
        ctx.window, ctx.softcap = window, softcap
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():  # create_graph=True: the Triton backward has no derivative of its own
            raise RuntimeError("flashpatch.attention has no double backward (create_graph=True); for higher-order "
                               "gradients use torch.nn.functional.scaled_dot_product_attention's math backend")
        q, k, v, out, lse, key_padding_mask, segment_ids, sinks = ctx.saved_tensors
        dq, dk, dv, dsinks = _backward_or_fallback(grad_out, q, k, v, out, lse, ctx.causal, ctx.scale,
                                                   key_padding_mask, ctx.dropout_p, ctx.seed, segment_ids,
                                                   ctx.window, ctx.softcap, sinks)
        return dq, dk, dv, None, None, None, None, None, None, None, None, dsinks


def _inference_call(q, k, v) -> bool:
    """Tensors outside torch.compile, autocast and autograd: a call a plan may serve unchecked. is_compiling first:
    a traced call must not read the plan cache (dynamo would guard on it and recompile)."""
    return (not torch.compiler.is_compiling() and isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)
            and isinstance(v, torch.Tensor) and not torch.is_autocast_enabled("cuda" if q.is_cuda else "cpu")
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)))


def attention_bshd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                   scale: float | None = None, key_padding_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                   seed: int | None = None, seqused_k: torch.Tensor | None = None,
                   segment_ids: torch.Tensor | None = None, window: tuple[int, int] | None = None,
                   softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """`attention`, returning [batch, Sq, Hq, D] (what transformers' attention functions return): the one route
    to the kernels. An inference call of a kind validated before goes straight to its plan."""
    if (not dropout_p and segment_ids is None and _inference_call(q, k, v)
            and (sinks is None or not (sinks.requires_grad and torch.is_grad_enabled()))):
        plan = kernels().plans.lookup(q, k, v, causal, q.shape[-1] ** -0.5 if scale is None else float(scale),
                                      key_padding_mask, seqused_k, window, softcap or None, sinks)
        if plan is not None:
            return plan.run(q, k, v, key_padding_mask, seqused_k, None, 0, sinks)[0]
    if isinstance(q, torch.Tensor) and torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in (q, k, v))
    check_inputs(q, k, v, key_padding_mask, seqused_k, segment_ids, window, softcap, sinks)
    if segment_ids is not None:
        segment_ids = segment_ids.to(torch.int32).contiguous()
    if window is not None:
        window = (window[0], window[1])
        if window == (-1, -1):
            window = None
    softcap = float(softcap) if softcap else None
    if sinks is not None and sinks.stride(0) != 1:  # the kernels read one logit per head at unit stride
        sinks = sinks.contiguous()
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise AttentionInputError(f"dropout_p must be in [0, 1), got {dropout_p}")
    grad_leaves = (q, k, v) if sinks is None else (q, k, v, sinks)
    training = torch.is_grad_enabled() and any(t.requires_grad for t in grad_leaves)
    if seqused_k is not None and (dropout_p or training):
        raise AttentionInputError("seqused_k is for inference over a KV cache (no dropout, no backward); to train, "
                                  "slice the keys to length and pass key_padding_mask")
    if dropout_p and q.shape[2] * k.shape[2] >= 2**31:
        raise AttentionInputError("dropout needs Sq * Sk < 2**31 (the mask's per-head counter is 32-bit)")
    if seed is None:
        seed = int(torch.randint(0, 2**30, (1,)).item()) if dropout_p else 0  # + head index stays in int32
    if q.shape[2] == 0 or k.shape[2] == 0:
        return torch.zeros_like(q).transpose(1, 2)
    if torch.compiler.is_compiling():
        out = _attention_fwd(q, k, v, causal, scale, key_padding_mask, dropout_p, seed, seqused_k, segment_ids,
                             *_window_args(window), softcap or 0.0, sinks)[0]
        return out.transpose(1, 2)
    if training:
        return _EagerAttention.apply(q, k, v, causal, scale, key_padding_mask, dropout_p, seed, segment_ids,
                                     window, softcap, sinks).transpose(1, 2)
    # Inference outside torch.compile: no dispatcher, no lse
    return _launch(q, k, v, causal, scale, key_padding_mask, dropout_p, seed, seqused_k, segment_ids,
                   need_lse=False, window=window, softcap=softcap, sinks=sinks)[0]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, scale: float | None = None,
              key_padding_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
              seed: int | None = None, seqused_k: torch.Tensor | None = None,
              segment_ids: torch.Tensor | None = None, window: tuple[int, int] | None = None,
              softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Flash attention in `torch.nn.functional.scaled_dot_product_attention`'s layout, differentiable.

    Arguments:
        q: (batch, Hq, Sq, D). k, v: (batch, Hkv, Sk, D), Hq a multiple of Hkv (GQA/MQA: query head h reads K/V
            head h // (Hq // Hkv), nothing copied). float16 or bfloat16 (tensor cores, float32 accumulation) or
            float32 (exact IEEE float32 dots, no TF32). D: a multiple of 8 up to 256. Any strides.
        causal: bool. Aligned bottom-right, as with a KV cache: query i sees keys j <= i + Sk - Sq.
            For Sq = 2, Sk = 5 (1 = attends):
                1 1 1 1 0
                1 1 1 1 1
            A query that sees no key (causal with Sq > Sk, or all keys masked) returns zeros.
        scale: float. The softmax scale; default 1 / sqrt(D).
        key_padding_mask: (batch, Sk) bool, True = attend.
        dropout_p: float in [0, 1). Attention dropout inside the kernels, with a counter-based (Philox) mask that
            the backward regenerates from `seed`.
        seed: int. The dropout mask's seed; default drawn from torch's CPU generator (torch.manual_seed repeats it).
        seqused_k: (batch,) int32 on the device, for a preallocated (static) KV cache: only the first seqused_k[b]
            keys exist, and causal alignment is to seqused_k[b] instead of Sk. Read on the device (no host sync:
            a decode step can be captured in a CUDA graph). Inference only.
        segment_ids: (batch, S) int32/int64, Sq == Sk == S: a padding-free packed batch; a query attends only to
            keys of its own segment (causally within it, with causal). Forward and backward.
        window: (left, right) ints, -1 = no bound on that side (flash-attn's window_size). Sliding-window
            (local) attention, aligned bottom-right like causal: query i sees keys j with
                i + Sk - Sq - left <= j <= i + Sk - Sq + right,
            within causal's j <= i + Sk - Sq as well (with causal, right is 0). For Sq = 4, Sk = 6, causal,
            window = (2, 0):
                1 1 1 0 0 0
                0 1 1 1 0 0
                0 0 1 1 1 0
                0 0 0 1 1 1
            transformers' `sliding_window = W` (a query sees itself and the W - 1 keys before it) is
            window = (W - 1, 0) with causal. Key blocks outside a tile's band are skipped, not computed. With
            seqused_k the alignment is to seqused_k[b]. Forward, backward and decode.
        softcap: float > 0, or None / 0 for none. Tanh softcapping of the scaled scores, as Gemma 2 does:
            scores = softcap * tanh(scale * q . k / softcap). Forward, backward and decode.
        sinks: (Hq,) floating point, one learned logit per query head (gpt-oss' `s_aux`) that joins every row's
            softmax with no value vector: out_i = sum_j exp(s_ij) v_j / (exp(sinks[h]) + sum_j exp(s_ij)). A row
            that sees no key returns zeros. Differentiable: d sinks[h] = -sum over batch and rows of
            P_sink * (dO . O). Forward, backward and decode.
    Return:
        out: (batch, Hq, Sq, D) in q's dtype, its memory laid out as (batch, Sq, Hq, D), transformers' layout.
    Raises:
        AttentionInputError: input the kernels can't take, naming what and what to do.

    Up to 16 query tokens against a cache take the flash-decoding kernel (keys split across programs, each holding
    a whole GQA group's query rows, partial results merged by log-sum-exp). Under autocast q, k, v are cast to the
    autocast dtype first, as SDPA does. Calls with a window that reaches ahead run the portable Triton kernels
    (never the Gluon sm90 or TMA forward); softcapped, causal-windowed and sink 16-bit calls on Hopper may run the
    Gluon sm90 forward, their backward the portable one.
    """
    return attention_bshd(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                          dropout_p=dropout_p, seed=seed, seqused_k=seqused_k, segment_ids=segment_ids,
                          window=window, softcap=softcap, sinks=sinks).transpose(1, 2)
