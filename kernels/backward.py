"""Flash-attention backward: dQ, dK, dV recomputed from the forward's log-sum-exp, no O(Sq * Sk) memory.

Two kernels, no atomics: one program per key block computes dK and dV, summing over every query head
of its GQA group; one program per query block computes dQ. Masking matches the forward exactly
(bottom-right causal, key padding, ragged tails, padded head dims).
"""

import torch
import triton
import triton.language as tl

from .config import TileConfig
from .forward import LOG2E, dropout_keep, same_segment
from .launch import cdiv, next_power_of_2


@triton.jit
def _probabilities(q, k, lse_log2, rows, cols, kpm_base, stride_mn, seg_base, qk_scale, seq_q, seq_k, causal_offset,
                   CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """P[rows, cols] of the forward softmax, from q [M, D], k^T [D, N] and the rows' log2-sum-exp2."""
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
    visible = (rows[:, None] < seq_q) & (cols[None, :] < seq_k)
    if CAUSAL:
        visible = visible & (cols[None, :] <= rows[:, None] + causal_offset)
    if HAS_KPM:
        keep = tl.load(kpm_base + cols * stride_mn, mask=cols < seq_k, other=0) != 0
        visible = visible & keep[None, :]
    if HAS_SEG:
        visible = visible & same_segment(seg_base, rows, cols, seq_k)
    # Rows that saw no key have lse = -inf and no gradient.
    lse_safe = tl.where(lse_log2 == float("-inf"), 0.0, lse_log2)
    return tl.where(visible, tl.math.exp2(s - lse_safe[:, None]), 0.0)


@triton.jit
def _flash_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KPM, SEG,
    qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_mb, stride_mn, stride_sb,
    num_heads_q, num_heads_k, group_size, seq_q, seq_k, head_dim, dropout_p, seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads_k
    kv_h = pid_bh % num_heads_k
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (cols[:, None] < seq_k) & (offs_d[None, :] < head_dim)

    k = tl.load(K + b.to(tl.int64) * stride_kb + kv_h * stride_kh + cols[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + kv_h * stride_vh + cols[:, None] * stride_vn
                + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    kpm_base = KPM + b * stride_mb
    seg_base = SEG + b * stride_sb
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    causal_offset = seq_k - seq_q
    lo = 0
    if CAUSAL:
        # Queries before this block's first key (shifted by the offset) never see it.
        lo = tl.maximum(pid_n * BLOCK_N - causal_offset, 0) // BLOCK_M * BLOCK_M
    for h in range(kv_h * group_size, (kv_h + 1) * group_size):  # GQA: sum over the group's query heads
        q_base = Q + b.to(tl.int64) * stride_qb + h * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + h * stride_doh
        row_base = (b * num_heads_q + h) * seq_q
        for start_m in range(lo, seq_q, BLOCK_M):
            rows = start_m + offs_m
            q_mask = (rows[:, None] < seq_q) & (offs_d[None, :] < head_dim)
            q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
            do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=q_mask,
                         other=0.0)
            lse = tl.load(LSE + row_base + rows, mask=rows < seq_q, other=float("-inf")) * 1.4426950408889634
            delta = tl.load(DELTA + row_base + rows, mask=rows < seq_q, other=0.0)
            p = _probabilities(q, tl.trans(k), lse, rows, cols, kpm_base, stride_mn, seg_base, qk_scale, seq_q,
                               seq_k, causal_offset, CAUSAL, HAS_KPM, HAS_SEG, DOT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            p_used = p
            if DROPOUT:  # same mask as the forward: P was dropped before it met V
                keep = dropout_keep(seed, b * num_heads_q + h, rows, cols, seq_k, dropout_p)
                p_used = tl.where(keep, p / (1.0 - dropout_p), 0.0)
                dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
            dv += tl.dot(tl.trans(p_used.to(do.dtype)), do, input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)

    tl.store(DK + b.to(tl.int64) * stride_dkb + kv_h * stride_dkh + cols[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkd, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b.to(tl.int64) * stride_dvb + kv_h * stride_dvh + cols[:, None] * stride_dvn
             + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _flash_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KPM, SEG,
    qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_mb, stride_mn, stride_sb,
    num_heads_q, group_size, seq_q, seq_k, head_dim, dropout_p, seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads_q
    h = pid_bh % num_heads_q
    kv_h = h // group_size
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (rows[:, None] < seq_q) & (offs_d[None, :] < head_dim)

    q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + rows[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h * stride_doh + rows[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=q_mask, other=0.0)
    lse = tl.load(LSE + pid_bh * seq_q + rows, mask=rows < seq_q, other=float("-inf")) * 1.4426950408889634
    delta = tl.load(DELTA + pid_bh * seq_q + rows, mask=rows < seq_q, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + kv_h * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kv_h * stride_vh
    kpm_base = KPM + b * stride_mb
    seg_base = SEG + b * stride_sb
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    causal_offset = seq_k - seq_q
    hi = seq_k
    if CAUSAL:
        hi = tl.maximum(tl.minimum(seq_k, (pid_m + 1) * BLOCK_M + causal_offset), 0)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < seq_k) & (offs_d[None, :] < head_dim)
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        p = _probabilities(q, tl.trans(k), lse, rows, cols, kpm_base, stride_mn, seg_base, qk_scale, seq_q, seq_k,
                           causal_offset, CAUSAL, HAS_KPM, HAS_SEG, DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = dropout_keep(seed, pid_bh, rows, cols, seq_k, dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    tl.store(DQ + b.to(tl.int64) * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqm
             + offs_d[None, :] * stride_dqd, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


def flash_attn_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, *, causal: bool, scale: float, key_padding_mask: torch.Tensor | None, config: TileConfig,
    dropout_p: float = 0.0, seed: int = 0, segment_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) for flash_attn_forward's (out, lse); dk/dv have k's (fewer, for GQA) heads."""
    batch, heads_q, seq_q, head_dim = q.shape
    heads_k, seq_k = k.shape[1], k.shape[2]
    # delta_i = sum_d dO_id * O_id: the softmax-gradient correction term per query row.
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(torch.uint8)
        stride_mb, stride_mn = kpm.stride()
    else:
        kpm, stride_mb, stride_mn = delta, 0, 0  # never read when HAS_KPM is False
    common = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=max(16, next_power_of_2(head_dim)),
                  CAUSAL=causal, HAS_KPM=key_padding_mask is not None, HAS_SEG=segment_ids is not None,
                  DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", DROPOUT=dropout_p > 0,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    lse = lse.contiguous()
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    seg, stride_sb = (delta, 0) if segment_ids is None else (segment_ids, segment_ids.stride(0))
    _flash_bwd_dkdv_kernel[(cdiv(seq_k, config.block_n), batch * heads_k)](
        q, k, v, grad_out, lse, delta, dk, dv, kpm, seg, scale * LOG2E, scale,
        *strides, *dk.stride(), *dv.stride(), stride_mb, stride_mn, stride_sb,
        heads_q, heads_k, heads_q // heads_k, seq_q, seq_k, head_dim, dropout_p, seed, **common)
    _flash_bwd_dq_kernel[(cdiv(seq_q, config.block_m), batch * heads_q)](
        q, k, v, grad_out, lse, delta, dq, kpm, seg, scale * LOG2E, scale,
        *strides, *dq.stride(), stride_mb, stride_mn, stride_sb,
        heads_q, heads_q // heads_k, seq_q, seq_k, head_dim, dropout_p, seed, **common)
    return dq, dk, dv
