"""Flash-attention backward: dQ, dK, dV recomputed from the forward's log-sum-exp, no O(Sq * Sk) memory.

Two kernels, no atomics, laid out like Triton's fused-attention tutorial: one program per key block computes
dK and dV (summing over every query head of its GQA group) working on transposed tiles (P^T, dS^T), so no
register tile is transposed; one program per query block computes dQ. Each walks its blocks in two loops:
blocks on the causal diagonal apply the causal mask, the rest skip it.

Ragged tails: every query row past seq_q and every key past seq_k gets P = 0 exactly, in both kernels and every
dtype, so dS = P * (dP - delta) is 0 there and no inf or NaN is formed. Out-of-range rows load Q = dO = 0 and
lse = +inf: P = exp2(0 - inf) = 0. Out-of-range keys load K = V = 0, which alone does NOT make P vanish: their score
is 0, so P = exp(-lse), which is huge where a row's scores are all very negative (in float16, dS passes 65504 from
about lse < -11, and its inf meets K = 0 in dS @ K: NaN over the row's dQ). So key blocks that run past seq_k mask P
by key index (BOUNDARY), and only those: when seq_k is not a multiple of BLOCK_N, the dQ kernel ends its key loop
with the ragged block on its own, and the dK/dV kernel gets a second launch for the ragged block's programs (a
branch inside its programs would compile the pipelined loop twice: on sm90 that took the head-dim-128 row's shared
memory from 164864 to 264192 bytes, past the limit). Whole-block and causal launches compile as without the mask.
Causal calls need neither: the causal test on diagonal blocks already gives P = 0 to every key past seq_k for every
row that exists, and blocks off the diagonal lie inside [0, seq_k). Rows that saw no key at all (lse = -inf) are
given lse = +inf the same way: they have no gradient. Out-of-range rows and keys are never stored. A padded key
(key_padding_mask) gets P = 0 in the dQ kernel; in the dK/dV kernel its row of P^T reaches only its own dK/dV rows,
which are zeroed at the store.

Sliding windows (WINDOW; causal is the window's right = 0): each program visits only the blocks of its band, the
blocks on a band edge masked, those wholly inside it not. A key past seq_k is outside every existing row's band when
right = 0 (as on the causal path); with right > 0 the ragged key block gets the BOUNDARY launch and the dQ kernel's
edge blocks test the key index. Softcapping (SOFTCAP): P is recomputed from the capped scores, and dS picks up the
cap's derivative, 1 - tanh^2. Sinks need nothing here: the forward's lse already holds them (P of the keys is
exp(s - lse) either way); their own gradient, -sum over rows of P_sink * (dO . O), takes P_sink from lse and dO . O
as the dQ kernel's sum of P * dP (delta comes from the stored O, rounded to q's dtype).
"""

import torch
import triton
import triton.language as tl

from .config import BackwardConfig
from .forward import dropout_keep, same_segment, segment_planes, segment_span
from .launch import CachedLauncher, cdiv, next_power_of_2
from .online_softmax import LOG2E, in_band, kernel_window, tanh, window_key_range


@triton.jit
def _bwd_delta_kernel(
    O, DO, DELTA, stride_ob, stride_oh, stride_om, stride_od, stride_dob, stride_doh, stride_dom, stride_dod,
    num_heads, seq_q, head_dim, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d] in fp32, without fp32 copies of O and dO."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < seq_q) & (offs_d[None, :] < head_dim)
    o = tl.load(O + b.to(tl.int64) * stride_ob + h * stride_oh + rows[:, None] * stride_om
                + offs_d[None, :] * stride_od, mask=mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h * stride_doh + rows[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + pid_bh * seq_q + rows, delta, mask=rows < seq_q)


@triton.jit
def _row_lse_log2(LSE, rows, seq_q):
    """Per-row log2-sum-exp2 for the exponent; +inf (P = 0) for rows past seq_q or that saw no key."""
    lse = tl.load(LSE + rows, mask=rows < seq_q, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E


@triton.jit
def _dkdv_steps(
    dk, dv, k, v, q_base, do_base, LSE, DELTA, seg_base, cols, offs_m, offs_d,
    stride_qm, stride_qd, stride_dom, stride_dod,
    qk_scale, seq_q, seq_k, head_dim, causal_offset, seed, row_head, dropout_p, start_m, end_m,
    seg_lo, seg_hi, cap_log2, win_left, win_right,
    BLOCK_M: tl.constexpr, MASK: tl.constexpr, BOUNDARY: tl.constexpr, HAS_SEG: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr = False,
    WINDOW: tl.constexpr = False,
):
    """Accumulate dK^T-side sums over the query blocks of [start_m, end_m) within [seg_lo, seg_hi) (the rows that
    can share this key block's segments; seg_lo a multiple of BLOCK_M) of one query head. MASK: the causal
    diagonal, or with WINDOW a band edge. BOUNDARY: this key block runs past seq_k (keys there get P = 0)."""
    if HAS_SEG:
        start_m, end_m = tl.maximum(start_m, seg_lo), tl.minimum(end_m, seg_hi)
    for m0 in range(start_m, end_m, BLOCK_M):
        rows = m0 + offs_m
        ld_mask = rows[None, :] < seq_q
        q_t = tl.load(q_base + rows[None, :] * stride_qm + offs_d[:, None] * stride_qd,
                      mask=ld_mask & (offs_d[:, None] < head_dim), other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                     mask=(rows[:, None] < seq_q) & (offs_d[None, :] < head_dim), other=0.0)
        lse = _row_lse_log2(LSE, rows, seq_q)
        delta = tl.load(DELTA + rows, mask=rows < seq_q, other=0.0)
        if SOFTCAP:
            tanh_t = tanh(tl.dot(k, q_t, input_precision=DOT_PRECISION) * qk_scale)
            p_t = tl.math.exp2(tanh_t * cap_log2 - lse[None, :])  # [N, M]
        else:
            p_t = tl.math.exp2(tl.dot(k, q_t, input_precision=DOT_PRECISION) * qk_scale - lse[None, :])  # [N, M]
        if MASK:
            if WINDOW:
                p_t = tl.where(in_band(cols[:, None], rows[None, :], causal_offset, win_left, win_right), p_t, 0.0)
            else:
                p_t = tl.where(cols[:, None] <= rows[None, :] + causal_offset, p_t, 0.0)
        if BOUNDARY:
            p_t = tl.where(cols[:, None] < seq_k, p_t, 0.0)
        if HAS_SEG:  # [cols, rows]: the same test with the roles swapped
            p_t = tl.where(same_segment(seg_base, cols, rows, seq_k), p_t, 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        p_used = p_t
        if DROPOUT:  # the forward's mask (same Philox counters, transposed): P was dropped before it met V
            keep = tl.rand(seed + row_head, rows[None, :] * seq_k + cols[:, None]) >= dropout_p
            p_used = tl.where(keep, p_t / (1.0 - dropout_p), 0.0)
            dp_t = tl.where(keep, dp_t / (1.0 - dropout_p), 0.0)
        dv += tl.dot(p_used.to(do.dtype), do, input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:  # d(cap * tanh(x / cap)) / dx
            ds_t = ds_t * (1.0 - tanh_t * tanh_t)
        dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=DOT_PRECISION)
    return dk, dv


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
    stride_mb, stride_mn, stride_sb, stride_sp,
    num_heads_q, num_heads_k, group_size, seq_q, seq_k, head_dim, dropout_p, cap_log2, win_left, win_right, seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DROPOUT: tl.constexpr, BOUNDARY: tl.constexpr, SOFTCAP: tl.constexpr = False, WINDOW: tl.constexpr = False,
):
    """One program per key block. BOUNDARY: a launch of the ragged last block's programs alone (non-causal, or a
    window whose right side is not the diagonal). WINDOW: only the query blocks whose band meets this key block."""
    pid_n = tl.program_id(0)
    if BOUNDARY:
        pid_n = seq_k // BLOCK_N
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads_k
    kv_h = pid_bh % num_heads_k
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (cols[:, None] < seq_k) & (offs_d[None, :] < head_dim)

    k = tl.load(K + b.to(tl.int64) * stride_kb + kv_h * stride_kh + cols[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + kv_h * stride_vh + cols[:, None] * stride_vn
                + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    seg_base = SEG + b * stride_sb
    seg_lo, seg_hi = 0, seq_q
    if HAS_SEG:  # only the query blocks of this key block's own sequences
        seg_lo, seg_hi = segment_span(seg_base, stride_sp, n0, BLOCK_N, seq_k, BLOCK_M)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    causal_offset = seq_k - seq_q
    start_m = 0
    full_m = 0
    end_m = seq_q
    if WINDOW:
        # Rows [start_m, end_m) see some key of this block; the whole query blocks of [full_m, full_end) see all of
        # it (query i sees keys [i + offset - left, i + offset + right]).
        start_m = tl.maximum(n0 - causal_offset - win_right, 0) // BLOCK_M * BLOCK_M
        end_m = tl.maximum(tl.minimum(n0 + BLOCK_N - causal_offset + win_left, seq_q), start_m)
        full_m = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - causal_offset - win_right, 0), BLOCK_M) * BLOCK_M
        full_end = tl.minimum(tl.maximum(n0 + 1 - causal_offset + win_left, 0) // BLOCK_M * BLOCK_M,
                              tl.cdiv(seq_q, BLOCK_M) * BLOCK_M)
        full_m = tl.minimum(tl.maximum(full_m, start_m), end_m)
        full_end = tl.maximum(tl.minimum(full_end, end_m), full_m)
    elif CAUSAL:
        # Query blocks before start_m never see this key block; from full_m on they see all of it.
        start_m = tl.maximum(n0 - causal_offset, 0) // BLOCK_M * BLOCK_M
        full_m = tl.minimum(tl.maximum(tl.cdiv(n0 + BLOCK_N - 1 - causal_offset, BLOCK_M) * BLOCK_M, start_m),
                            tl.cdiv(seq_q, BLOCK_M) * BLOCK_M)
    for h in range(kv_h * group_size, (kv_h + 1) * group_size):  # GQA: sum over the group's query heads
        q_base = Q + b.to(tl.int64) * stride_qb + h * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + h * stride_doh
        row_base = (b * num_heads_q + h) * seq_q
        if WINDOW:
            dk, dv = _dkdv_steps(dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base, seg_base, cols,
                                 offs_m, offs_d, stride_qm, stride_qd, stride_dom, stride_dod, qk_scale, seq_q, seq_k,
                                 head_dim, causal_offset, seed, b * num_heads_q + h, dropout_p, start_m, full_m,
                                 seg_lo, seg_hi, cap_log2, win_left, win_right,
                                 BLOCK_M, True, BOUNDARY, HAS_SEG, DOT_PRECISION, DROPOUT, SOFTCAP, True)
            dk, dv = _dkdv_steps(dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base, seg_base, cols,
                                 offs_m, offs_d, stride_qm, stride_qd, stride_dom, stride_dod, qk_scale, seq_q, seq_k,
                                 head_dim, causal_offset, seed, b * num_heads_q + h, dropout_p, full_m, full_end,
                                 seg_lo, seg_hi, cap_log2, win_left, win_right,
                                 BLOCK_M, False, BOUNDARY, HAS_SEG, DOT_PRECISION, DROPOUT, SOFTCAP, True)
            dk, dv = _dkdv_steps(dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base, seg_base, cols,
                                 offs_m, offs_d, stride_qm, stride_qd, stride_dom, stride_dod, qk_scale, seq_q, seq_k,
                                 head_dim, causal_offset, seed, b * num_heads_q + h, dropout_p, full_end, end_m,
                                 seg_lo, seg_hi, cap_log2, win_left, win_right,
                                 BLOCK_M, True, BOUNDARY, HAS_SEG, DOT_PRECISION, DROPOUT, SOFTCAP, True)
        else:
            if CAUSAL:
                dk, dv = _dkdv_steps(dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base, seg_base,
                                     cols, offs_m, offs_d, stride_qm, stride_qd, stride_dom, stride_dod, qk_scale,
                                     seq_q, seq_k, head_dim, causal_offset, seed, b * num_heads_q + h, dropout_p,
                                     start_m, full_m, seg_lo, seg_hi, cap_log2, win_left, win_right,
                                     BLOCK_M, True, False, HAS_SEG, DOT_PRECISION, DROPOUT, SOFTCAP, False)
            dk, dv = _dkdv_steps(dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base, seg_base, cols,
                                 offs_m, offs_d, stride_qm, stride_qd, stride_dom, stride_dod, qk_scale, seq_q, seq_k,
                                 head_dim, causal_offset, seed, b * num_heads_q + h, dropout_p, full_m, end_m,
                                 seg_lo, seg_hi, cap_log2, win_left, win_right,
                                 BLOCK_M, False, BOUNDARY, HAS_SEG, DOT_PRECISION, DROPOUT, SOFTCAP, False)
    if HAS_KPM:  # a padded key gets no gradient; nothing else in this program depends on it
        keep = tl.load(KPM + b * stride_mb + cols * stride_mn, mask=cols < seq_k, other=0) != 0
        dk = tl.where(keep[:, None], dk, 0.0)
        dv = tl.where(keep[:, None], dv, 0.0)

    tl.store(DK + b.to(tl.int64) * stride_dkb + kv_h * stride_dkh + cols[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkd, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b.to(tl.int64) * stride_dvb + kv_h * stride_dvh + cols[:, None] * stride_dvn
             + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_steps(
    dq, pdp, q, do, lse, delta, k_base, v_base, kpm_base, seg_base, rows, offs_n, offs_d,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
    qk_scale, seq_k, head_dim, causal_offset, seed, row_head, dropout_p, start_n, end_n,
    seg_lo, seg_hi, cap_log2, win_left, win_right,
    BLOCK_N: tl.constexpr, MASK: tl.constexpr, BOUNDARY: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_SEG: tl.constexpr, DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr = False,
    WINDOW: tl.constexpr = False, ROW_PDP: tl.constexpr = False,
):
    """Accumulate dQ over the key blocks of [start_n, end_n) within [seg_lo, seg_hi) (the keys that can share this
    query block's segments; seg_lo a multiple of BLOCK_N). MASK: the causal diagonal, or with WINDOW a band edge.
    BOUNDARY: the blocks run past seq_k (keys there get P = 0). ROW_PDP: also sum P * dP over each row's keys into
    pdp (float32), which is dO . O without the rounding of the stored O."""
    if HAS_SEG:
        start_n, end_n = tl.maximum(start_n, seg_lo), tl.minimum(end_n, seg_hi)
    for n0 in range(start_n, end_n, BLOCK_N):
        cols = n0 + offs_n
        ld_mask = (cols[None, :] < seq_k) & (offs_d[:, None] < head_dim)
        k_t = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=ld_mask, other=0.0)
        v_t = tl.load(v_base + cols[None, :] * stride_vn + offs_d[:, None] * stride_vd, mask=ld_mask, other=0.0)
        if SOFTCAP:
            tanh_s = tanh(tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale)
            p = tl.math.exp2(tanh_s * cap_log2 - lse[:, None])
        else:
            p = tl.math.exp2(tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale - lse[:, None])
        if MASK:
            if WINDOW:
                p = tl.where(in_band(cols[None, :], rows[:, None], causal_offset, win_left, win_right), p, 0.0)
            else:
                p = tl.where(cols[None, :] <= rows[:, None] + causal_offset, p, 0.0)
        if BOUNDARY:
            p = tl.where(cols[None, :] < seq_k, p, 0.0)
        if HAS_KPM:
            keep_col = tl.load(kpm_base + cols * stride_mn, mask=cols < seq_k, other=0) != 0
            p = tl.where(keep_col[None, :], p, 0.0)
        if HAS_SEG:
            p = tl.where(same_segment(seg_base, rows, cols, seq_k), p, 0.0)
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = dropout_keep(seed, row_head, rows, cols, seq_k, dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        if ROW_PDP:
            pdp += tl.sum(p * dp, axis=1)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - tanh_s * tanh_s)
        dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=DOT_PRECISION)
    return dq, pdp


@triton.jit
def _flash_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KPM, SEG, PDP,
    qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_mb, stride_mn, stride_sb, stride_sp,
    num_heads_q, group_size, seq_q, seq_k, head_dim, dropout_p, cap_log2, win_left, win_right, seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DROPOUT: tl.constexpr, BOUNDARY: tl.constexpr, SOFTCAP: tl.constexpr = False, WINDOW: tl.constexpr = False,
    ROW_PDP: tl.constexpr = False,
):
    """One program per query block. BOUNDARY (non-causal, seq_k not a multiple of BLOCK_N): the key loop stops at the
    last whole block and the ragged one follows on its own, masked. WINDOW: the key blocks of this query block's
    band only, its edge blocks (and the ragged tail) masked. ROW_PDP: each row's sum of P * dP into PDP [B, Hq, Sq]
    (the sinks' gradient)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads_q
    h = pid_bh % num_heads_q
    kv_h = h // group_size
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (rows[:, None] < seq_q) & (offs_d[None, :] < head_dim)

    q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + rows[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h * stride_doh + rows[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=q_mask, other=0.0)
    lse = _row_lse_log2(LSE + pid_bh * seq_q, rows, seq_q)
    delta = tl.load(DELTA + pid_bh * seq_q + rows, mask=rows < seq_q, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + kv_h * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kv_h * stride_vh
    kpm_base = KPM + b * stride_mb
    seg_base = SEG + b * stride_sb
    seg_lo, seg_hi = 0, seq_k
    if HAS_SEG:  # only the key blocks of this query block's own sequences
        seg_lo, seg_hi = segment_span(seg_base, stride_sp, m0, BLOCK_M, seq_q, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    pdp = tl.zeros([BLOCK_M], dtype=tl.float32)

    causal_offset = seq_k - seq_q
    if WINDOW:
        lo, full_lo, full_hi, hi = window_key_range(m0, causal_offset, seq_k, win_left, win_right, BLOCK_M, BLOCK_N)
        dq, pdp = _dq_steps(dq, pdp, q, do, lse, delta, k_base, v_base, kpm_base, seg_base, rows, offs_n, offs_d,
                            stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, qk_scale, seq_k, head_dim,
                            causal_offset, seed, pid_bh, dropout_p, lo, full_lo,
                            seg_lo, seg_hi, cap_log2, win_left, win_right,
                            BLOCK_N, True, True, HAS_KPM, HAS_SEG, DOT_PRECISION, DROPOUT, SOFTCAP, True, ROW_PDP)
        dq, pdp = _dq_steps(dq, pdp, q, do, lse, delta, k_base, v_base, kpm_base, seg_base, rows, offs_n, offs_d,
                            stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, qk_scale, seq_k, head_dim,
                            causal_offset, seed, pid_bh, dropout_p, full_lo, full_hi,
                            seg_lo, seg_hi, cap_log2, win_left, win_right,
                            BLOCK_N, False, False, HAS_KPM, HAS_SEG, DOT_PRECISION, DROPOUT, SOFTCAP, True, ROW_PDP)
        dq, pdp = _dq_steps(dq, pdp, q, do, lse, delta, k_base, v_base, kpm_base, seg_base, rows, offs_n, offs_d,
                            stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, qk_scale, seq_k, head_dim,
                            causal_offset, seed, pid_bh, dropout_p, full_hi, hi,
                            seg_lo, seg_hi, cap_log2, win_left, win_right,
                            BLOCK_N, True, True, HAS_KPM, HAS_SEG, DOT_PRECISION, DROPOUT, SOFTCAP, True, ROW_PDP)
    else:
        full_n = tl.cdiv(seq_k, BLOCK_N) * BLOCK_N
        if BOUNDARY:
            full_n = seq_k // BLOCK_N * BLOCK_N
        end_n = full_n
        if CAUSAL:
            # Key blocks before full_n are visible to every row of this block; [full_n, end_n) straddle the diagonal.
            end_n = tl.maximum(tl.minimum(seq_k, m0 + BLOCK_M + causal_offset), 0)
            full_n = tl.minimum(tl.maximum(m0 + 1 + causal_offset, 0) // BLOCK_N * BLOCK_N, end_n)
            dq, pdp = _dq_steps(dq, pdp, q, do, lse, delta, k_base, v_base, kpm_base, seg_base, rows, offs_n, offs_d,
                                stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, qk_scale, seq_k, head_dim,
                                causal_offset, seed, pid_bh, dropout_p, full_n, end_n,
                                seg_lo, seg_hi, cap_log2, win_left, win_right,
                                BLOCK_N, True, False, HAS_KPM, HAS_SEG, DOT_PRECISION, DROPOUT, SOFTCAP, False, ROW_PDP)
        dq, pdp = _dq_steps(dq, pdp, q, do, lse, delta, k_base, v_base, kpm_base, seg_base, rows, offs_n, offs_d,
                            stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, qk_scale, seq_k, head_dim,
                            causal_offset, seed, pid_bh, dropout_p, 0, full_n,
                            seg_lo, seg_hi, cap_log2, win_left, win_right,
                            BLOCK_N, False, False, HAS_KPM, HAS_SEG, DOT_PRECISION, DROPOUT, SOFTCAP, False, ROW_PDP)
        if BOUNDARY:
            dq, pdp = _dq_steps(dq, pdp, q, do, lse, delta, k_base, v_base, kpm_base, seg_base, rows, offs_n, offs_d,
                                stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, qk_scale, seq_k, head_dim,
                                causal_offset, seed, pid_bh, dropout_p, full_n, seq_k,
                                seg_lo, seg_hi, cap_log2, win_left, win_right,
                                BLOCK_N, False, True, HAS_KPM, HAS_SEG, DOT_PRECISION, DROPOUT, SOFTCAP, False, ROW_PDP)

    tl.store(DQ + b.to(tl.int64) * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqm
             + offs_d[None, :] * stride_dqd, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)
    if ROW_PDP:
        tl.store(PDP + pid_bh * seq_q + rows, pdp, mask=rows < seq_q)


_launch_delta = CachedLauncher(_bwd_delta_kernel)
_launch_dkdv = CachedLauncher(_flash_bwd_dkdv_kernel)
_launch_dq = CachedLauncher(_flash_bwd_dq_kernel)


def flash_attn_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, *, causal: bool, scale: float, key_padding_mask: torch.Tensor | None, config: BackwardConfig,
    dropout_p: float = 0.0, seed: int = 0, segment_ids: torch.Tensor | None = None,
    window: tuple[int, int] | None = None, softcap: float = 0.0, sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dq, dk, dv, dsinks) for flash_attn_forward's (out, lse); dk/dv have k's (fewer, for GQA) heads; dsinks
    ([Hq] float32, None without sinks) = -sum over batch and rows of P_sink * delta, P_sink = exp(sink - lse)."""
    batch, heads_q, seq_q, head_dim = q.shape
    heads_k, seq_k = k.shape[1], k.shape[2]
    block_d = max(16, next_power_of_2(head_dim))
    # delta_i = sum_d dO_id * O_id: the softmax-gradient correction term per query row.
    delta = torch.empty((batch, heads_q, seq_q), device=q.device, dtype=torch.float32)
    delta_rows = max(1, min(64, 8192 // block_d))
    _launch_delta((cdiv(seq_q, delta_rows), batch * heads_q),
        out, grad_out, delta, *out.stride(), *grad_out.stride(), heads_q, seq_q, head_dim,
        BLOCK_M=delta_rows, BLOCK_D=block_d)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(torch.uint8)
        stride_mb, stride_mn = kpm.stride()
    else:
        kpm, stride_mb, stride_mn = delta, 0, 0  # never read when HAS_KPM is False
    band = kernel_window(causal, window)
    win_left, win_right = band or (0, 0)
    qk_scale, cap_log2 = (scale / softcap, softcap * LOG2E.value) if softcap else (scale * LOG2E.value, 0.0)
    common = dict(BLOCK_D=block_d, CAUSAL=causal and band is None, HAS_KPM=key_padding_mask is not None,
                  HAS_SEG=segment_ids is not None, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                  DROPOUT=dropout_p > 0, SOFTCAP=bool(softcap), WINDOW=band is not None)
    lse = lse.contiguous()
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    seg, stride_sb, stride_sp = delta, 0, 0  # never read without HAS_SEG
    if segment_ids is not None:
        seg = segment_planes(segment_ids)
        stride_sp, stride_sb = seg.stride(0), seg.stride(1)
    dkdv, dq_tiles = config.dkdv, config.dq
    # A ragged key length without the causal diagonal: the last key block masks keys past seq_k (BOUNDARY), the
    # rest need not. dK/dV: whole key blocks in one launch, the ragged block's programs in a second; dQ: a flag for
    # its key loop (a window's edge blocks test the key index anyway).
    diagonal = causal or (band is not None and win_right == 0)
    dkdv_ragged = not diagonal and seq_k % dkdv.block_n != 0
    whole = seq_k // dkdv.block_n if dkdv_ragged else cdiv(seq_k, dkdv.block_n)
    for blocks, boundary in ((whole, False), (int(dkdv_ragged), True)):
        if blocks:
            _launch_dkdv((blocks, batch * heads_k),
                q, k, v, grad_out, lse, delta, dk, dv, kpm, seg, qk_scale, scale,
                *strides, *dk.stride(), *dv.stride(), stride_mb, stride_mn, stride_sb, stride_sp,
                heads_q, heads_k, heads_q // heads_k, seq_q, seq_k, head_dim, dropout_p, cap_log2, win_left,
                win_right, seed,
                BLOCK_M=dkdv.block_m, BLOCK_N=dkdv.block_n, num_warps=dkdv.num_warps, num_stages=dkdv.num_stages,
                BOUNDARY=boundary, **common)
    # With sinks, the dQ kernel also sums P * dP per row: dO . O before O was rounded to q's dtype, for the sinks'
    # gradient (taken from delta, the stored O's float16 rounding put it up to 0.4 % off; this sum is float32 math).
    pdp = torch.empty_like(delta) if sinks is not None else delta  # never written without ROW_PDP
    _launch_dq((cdiv(seq_q, dq_tiles.block_m), batch * heads_q),
        q, k, v, grad_out, lse, delta, dq, kpm, seg, pdp, qk_scale, scale,
        *strides, *dq.stride(), stride_mb, stride_mn, stride_sb, stride_sp,
        heads_q, heads_q // heads_k, seq_q, seq_k, head_dim, dropout_p, cap_log2, win_left, win_right, seed,
        BLOCK_M=dq_tiles.block_m, BLOCK_N=dq_tiles.block_n, num_warps=dq_tiles.num_warps,
        num_stages=dq_tiles.num_stages, BOUNDARY=band is None and not causal and seq_k % dq_tiles.block_n != 0,
        ROW_PDP=sinks is not None, **common)
    dsinks = None
    if sinks is not None:  # d sink_h = sum_rows P_sink * (dP_sink - dO . O), and dP_sink = dO . 0
        p_sink = torch.exp(sinks.float()[None, :, None] - lse)
        dsinks = -(p_sink * pdp).sum((0, 2))
    return dq, dk, dv, dsinks
