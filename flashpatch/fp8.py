"""`flashpatch.attention_fp8`: an FP8 (e4m3) forward on Hopper with per-tensor scales, inference only.

Quantizes 16-bit q, k, v per tensor (amax -> 448, on the device), runs kernels/forward_fp8.py and returns q's
dtype. Accuracy against the 16-bit op is in BENCHMARKS.md; it is an opt-in op, never what `apply` routes to.
"""

from __future__ import annotations

import torch

from .dispatch import device_guard, device_info, kernels
from .ops import AttentionInputError, check_inputs

FP8_FAMILIES = ("sm90",)  # the GPUs it has been measured on


def attention_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                  scale: float | None = None) -> torch.Tensor:
    """Like `flashpatch.attention` (SDPA's layout, GQA, bottom-right causal), with both matmuls in FP8.

    q: [batch, Hq, Sq, D]; k, v: [batch, Hkv, Sk, D]; float16 or bfloat16; D 64 or 128. No masks, dropout
    or gradients. Returns [batch, Hq, Sq, D] in q's dtype.
    """
    check_inputs(q, k, v, None)
    triton_kernels = kernels()
    head_dim = q.shape[-1]
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise AttentionInputError(f"attention_fp8 quantizes 16-bit inputs; got {q.dtype}: cast to bfloat16 first")
    if head_dim not in triton_kernels.forward_fp8.FP8_HEAD_DIMS:
        raise AttentionInputError(f"attention_fp8 serves head_dim 64 or 128, got {head_dim}: use flashpatch.attention")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise AttentionInputError("attention_fp8 is inference only (no backward): call it under torch.no_grad(), "
                                  "or use flashpatch.attention to train")
    path, _, index = device_info(q)
    if not path.usable:
        raise AttentionInputError(f"flashpatch kernels cannot run here: {path.reason}")
    if q.is_cuda and path.family not in FP8_FAMILIES:
        raise AttentionInputError(f"attention_fp8 runs on Hopper (sm90) GPUs; this is {path.family or path.name}: "
                                  "use flashpatch.attention")
    scale = head_dim ** -0.5 if scale is None else float(scale)
    if q.shape[2] == 0 or k.shape[2] == 0:
        return torch.zeros_like(q)
    with device_guard(index):
        q8, q_descale = triton_kernels.quantize_per_tensor(q)
        k8, k_descale = triton_kernels.quantize_per_tensor(k)
        vt8, v_descale = triton_kernels.quantize_per_tensor(v, transpose=True)
        descale = torch.cat([q_descale, k_descale, v_descale])

        def launch(config):
            return triton_kernels.flash_attn_forward_fp8(q8, k8, vt8, descale, causal=causal, scale=scale,
                                                         config=config, out_dtype=q.dtype)

        candidates = triton_kernels.fp8_candidates(path.family, head_dim)
        if len(candidates) > 1 and not torch.cuda.is_current_stream_capturing():
            key = triton_kernels.tune_key(head_dim, "float8_e4m3fn", causal, q.shape[2], k.shape[2],
                                          q.shape[0] * q.shape[1])
            pick = triton_kernels.AUTOTUNER.pick(path.family, key, candidates,
                                                 lambda cfg: triton_kernels.autotune.time_ms(lambda: launch(cfg)))
            return launch(pick)
        return launch(candidates[0])
