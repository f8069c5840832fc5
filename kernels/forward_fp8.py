"""FP8 (e4m3) forward for Hopper, FA3-style: Q, K and V quantized per tensor, both matmuls in FP8 with float32
accumulation, the softmax in float32.

- Each of Q, K, V carries one float32 descale (its amax / 448, `quantize_per_tensor`), read on the device: no
  host sync. QKᵀ is rescaled by q_descale * k_descale inside the softmax scale, the output by v_descale.
- The probabilities P (in [0, 1]) are multiplied by 2^8 before their cast to e4m3, whose smallest subnormal is
  2^-9: unscaled, every weight below ~0.002 would round to zero while still counting in the row sum. The factor
  is exact and divided out at the end.
- Hopper's FP8 tensor-core instructions read both operands K-major, so V comes transposed ([B, H, D, Sk]);
  `quantize_per_tensor(v, transpose=True)` writes it that way as part of the cast.
Inference only (no backward); plain attention only (causal or not, GQA; no masks or dropout).
"""

import torch
import triton
import triton.language as tl

from .config import TileConfig
from .launch import _is_interpreted, cdiv
from .online_softmax import LOG2E, finish_rows, key_range, softmax_step, visible_keys

E4M3_MAX = 448.0
P_SCALE = tl.constexpr(256.0)  # P is multiplied by it before the e4m3 cast (see above), divided out at the end
FP8_HEAD_DIMS = (64, 128)


@triton.jit
def _to_e4m3(x, ROUND_FIRST: tl.constexpr):
    """float32 -> e4m3 (round to nearest; inputs already within +-448)."""
    if ROUND_FIRST:
        # Triton's CPU interpreter drops the carry when rounding overflows the mantissa (126.2 -> 64; triton issue
        # 8322, PR 11897): round onto e4m3's grid in float32 first, so that its cast has nothing left to round.
        exponent = tl.maximum(((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)  # subnormals: 2^-6's step
        step = tl.math.exp2((exponent - 3).to(tl.float32))
        x = tl.math.floor(x / step + 0.5) * step
    return x.to(tl.float8e4nv)


@triton.jit
def _fp8_block(acc, l_i, m_i, q, k_base, vt_base, stride_kn, stride_vn, start_n, offs_m, offs_n, offs_d,
               qk_scale, seq_k, causal_offset, MASK: tl.constexpr, CAUSAL: tl.constexpr, ROUND_FIRST: tl.constexpr):
    cols = start_n + offs_n
    k_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None]  # [D, N], D contiguous (K-major)
    vt_ptrs = vt_base + offs_d[:, None] * stride_vn + cols[None, :]  # [D, N], N contiguous (K-major for P @ V)
    if MASK:
        k = tl.load(k_ptrs, mask=cols[None, :] < seq_k, other=0.0)
        vt = tl.load(vt_ptrs, mask=cols[None, :] < seq_k, other=0.0)
    else:
        k = tl.load(k_ptrs)
        vt = tl.load(vt_ptrs)
    qk = tl.dot(q, k) * qk_scale
    if MASK:  # the causal diagonal and the ragged last block
        qk = tl.where(visible_keys(cols, offs_m, seq_k, causal_offset, CAUSAL), qk, float("-inf"))
    p, alpha, l_i, m_new = softmax_step(qk, m_i, l_i, MASK)
    acc = acc * alpha[:, None] + tl.dot(_to_e4m3(p * P_SCALE, ROUND_FIRST), tl.trans(vt))
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["seq_q", "seq_k"])
def _flash_fwd_fp8_kernel(
    Q, K, VT, O, DESCALE, qk_scale,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    num_heads, group_size, seq_q, seq_k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
    ROUND_FIRST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    kv_h = h // group_size
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q_descale = tl.load(DESCALE)
    k_descale = tl.load(DESCALE + 1)
    v_descale = tl.load(DESCALE + 2)
    qk_scale = qk_scale * q_descale * k_descale
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=offs_m[:, None] < seq_q, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + kv_h * stride_kh
    vt_base = VT + b.to(tl.int64) * stride_vb + kv_h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    causal_offset = seq_k - seq_q  # bottom-right: query i sees keys j <= i + offset
    unmasked_hi, hi = key_range(m0, causal_offset, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
    for start_n in range(0, unmasked_hi, BLOCK_N):
        acc, l_i, m_i = _fp8_block(acc, l_i, m_i, q, k_base, vt_base, stride_kn, stride_vn, start_n, offs_m, offs_n,
                                   offs_d, qk_scale, seq_k, causal_offset, False, CAUSAL, ROUND_FIRST)
    for start_n in range(unmasked_hi, hi, BLOCK_N):
        acc, l_i, m_i = _fp8_block(acc, l_i, m_i, q, k_base, vt_base, stride_kn, stride_vn, start_n, offs_m, offs_n,
                                   offs_d, qk_scale, seq_k, causal_offset, True, CAUSAL, ROUND_FIRST)

    out, _ = finish_rows(acc, l_i, m_i)  # a row that saw no key returns zeros
    out = out * (v_descale / P_SCALE)
    tl.store(O + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=offs_m[:, None] < seq_q)


@triton.jit
def _quantize_kernel(X, Y, DESCALE,
                     stride_xb, stride_xh, stride_xs, stride_xd,
                     stride_yb, stride_yh, stride_ys, stride_yd,
                     num_heads, seq, head_dim, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                     ROUND_FIRST: tl.constexpr):
    """Y = saturate(X / descale) in e4m3, one [BLOCK_S, D] tile of one (batch, head); any strides on both sides,
    so the transposed V is written in the same pass."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = pid_bh % num_heads
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_s[:, None] < seq) & (offs_d[None, :] < head_dim)
    x = tl.load(X + b * stride_xb + h * stride_xh + offs_s[:, None] * stride_xs + offs_d[None, :] * stride_xd,
                mask=mask, other=0.0).to(tl.float32)
    y = tl.clamp(x * (1.0 / tl.load(DESCALE)), -448.0, 448.0)
    tl.store(Y + b * stride_yb + h * stride_yh + offs_s[:, None] * stride_ys + offs_d[None, :] * stride_yd,
             _to_e4m3(y, ROUND_FIRST), mask=mask)


def quantize_per_tensor(t: torch.Tensor, transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 copy of a [B, H, S, D] tensor scaled so that its amax maps to 448, float32 descale [1]) on t's
    device, no host sync: one reading pass for the amax, one for the cast. transpose=True stores [B, H, D, S]
    (V's layout for the FP8 kernel)."""
    low, high = torch.aminmax(t.detach())
    descale = (torch.maximum(-low, high).float() / E4M3_MAX).clamp_min(1e-12).reshape(1)
    batch, heads, seq, head_dim = t.shape
    if transpose:
        out = torch.empty((batch, heads, head_dim, seq), device=t.device, dtype=torch.float8_e4m3fn)
        out_strides = (out.stride(0), out.stride(1), out.stride(3), out.stride(2))
    else:
        out = torch.empty((batch, heads, seq, head_dim), device=t.device, dtype=torch.float8_e4m3fn)
        out_strides = out.stride()
    if t.numel() == 0:
        return out, descale
    block_s = 64
    _quantize_kernel[(cdiv(seq, block_s), batch * heads)](
        t, out, descale, *t.stride(), *out_strides, heads, seq, head_dim,
        BLOCK_S=block_s, BLOCK_D=max(16, 1 << (head_dim - 1).bit_length()),
        ROUND_FIRST=_is_interpreted(_quantize_kernel))
    return out, descale


def flash_attn_forward_fp8(q8: torch.Tensor, k8: torch.Tensor, vt8: torch.Tensor, descale: torch.Tensor, *,
                           causal: bool, scale: float, config: TileConfig, out_dtype=torch.bfloat16) -> torch.Tensor:
    """q8 [B, Hq, Sq, D], k8 [B, Hk, Sk, D], vt8 [B, Hk, D, Sk]: float8_e4m3fn with a unit innermost stride;
    descale: float32 [3] (q, k, v). Returns [B, Hq, Sq, D] in out_dtype, stored as [B, Sq, Hq, D]."""
    batch, heads_q, seq_q, head_dim = q8.shape
    heads_k, seq_k = k8.shape[1], k8.shape[2]
    out = torch.empty((batch, seq_q, heads_q, head_dim), device=q8.device, dtype=out_dtype).transpose(1, 2)
    grid = (cdiv(seq_q, config.block_m), batch * heads_q)
    _flash_fwd_fp8_kernel[grid](
        q8, k8, vt8, out, descale, scale * LOG2E.value,
        *q8.stride()[:3], *k8.stride()[:3], *vt8.stride()[:3], *out.stride()[:3],
        heads_q, heads_q // heads_k, seq_q, seq_k,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, HEAD_DIM=head_dim, CAUSAL=causal,
        ROUND_FIRST=_is_interpreted(_flash_fwd_fp8_kernel), num_warps=config.num_warps, num_stages=config.num_stages)
    return out
