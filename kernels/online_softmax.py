"""The pieces the kernels share: which key blocks a query tile visits (causal, or a sliding window's band), the
masks of a block, softcapped scores, one online-softmax step, the sink logit, and the epilogue that normalises the
rows and gives their log-sum-exp.

Scores are scaled into base 2 once (qk_scale = softmax scale * LOG2E), so the kernels use exp2/log2; the lse they
return is in natural log, as SDPA's and FA2's are. With softcapping the score is cap * tanh(scale * q.k / cap)
(the scale applied before the cap, as Gemma 2 does): qk_scale is then scale / cap and cap_log2 = cap * LOG2E.

A sliding window (flash-attn's semantics) lets query i see keys j with
    i + offset - left <= j <= i + offset + right,    offset = seq_k - seq_q (bottom-right alignment),
a side with no bound is given as WINDOW_UNBOUNDED; causal with a window is right = 0.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e); `LOG2E.value` on the host
# A window side without bound: larger than any distance between a query and a key (and small enough that
# positions plus it stay in int32).
WINDOW_UNBOUNDED = 1 << 30


def kernel_window(causal: bool, window) -> tuple[int, int] | None:
    """The (left, right) band a kernel applies for a call's `causal` and `window` ((left, right), -1 = no bound on
    that side; causal makes right 0), sides without bound as WINDOW_UNBOUNDED; None where the window bounds nothing
    beyond what `causal` does (the kernels then run their causal or full path)."""
    if window is None:
        return None
    left, right = window
    if causal:
        right = 0
    if left < 0 and (causal or right < 0):
        return None
    return (WINDOW_UNBOUNDED if left < 0 else int(left), WINDOW_UNBOUNDED if right < 0 else int(right))


@triton.jit
def key_range(m0, causal_offset, seq_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(unmasked_hi, hi) for the query tile starting at row m0: blocks below unmasked_hi need no mask;
    [unmasked_hi, hi) hold the causal diagonal and the ragged tail. Causal alignment is bottom-right: query i sees
    keys j <= i + causal_offset (seq_k - seq_q). Key blocks past the tile's last row are never visible: skipped."""
    hi = seq_k
    unmasked_hi = seq_k
    if CAUSAL:
        hi = tl.minimum(seq_k, m0 + BLOCK_M + causal_offset)
        unmasked_hi = tl.minimum(seq_k, m0 + causal_offset + 1)
    hi = tl.maximum(hi, 0)
    return tl.minimum(tl.maximum(unmasked_hi, 0) // BLOCK_N * BLOCK_N, hi), hi


@triton.jit
def visible_keys(cols, rows, seq_k, causal_offset, CAUSAL: tl.constexpr):
    """[rows, cols]: key exists (col < seq_k) and, when CAUSAL, col <= row + causal_offset."""
    visible = cols[None, :] < seq_k
    if CAUSAL:
        visible = visible & (cols[None, :] <= rows[:, None] + causal_offset)
    return visible


@triton.jit
def window_key_range(m0, offset, seq_k, win_left, win_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(lo, full_lo, full_hi, hi) for the query tile of rows [m0, m0 + BLOCK_M) under a sliding window: keys
    [lo, hi) are the union of the rows' bands; the whole blocks of [full_lo, full_hi) lie inside every row's band
    (no mask needed), [lo, full_lo) and [full_hi, hi) straddle a band edge or the ragged tail (masked). Key blocks
    outside [lo, hi) are never visited. lo, full_lo and full_hi are multiples of BLOCK_N, in that order, <= hi."""
    lo = tl.maximum(m0 + offset - win_left, 0) // BLOCK_N * BLOCK_N
    hi = tl.maximum(tl.minimum(m0 + BLOCK_M + offset + win_right, seq_k), lo)
    # Every row of the tile sees keys from its last row's first key to its first row's last key.
    full_lo = tl.cdiv(tl.maximum(m0 + BLOCK_M - 1 + offset - win_left, 0), BLOCK_N) * BLOCK_N
    full_hi = tl.maximum(tl.minimum(m0 + offset + win_right + 1, seq_k), 0) // BLOCK_N * BLOCK_N
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def in_band(cols, rows, offset, win_left, win_right):
    """Key index `cols` lies in the window of query index `rows` (tensors broadcast against each other: [M, 1] rows
    and [1, N] cols in the forward, the transpose in the dK/dV kernel)."""
    rel = cols - rows - offset
    return (rel >= -win_left) & (rel <= win_right)


@triton.jit
def band_keys(cols, rows, seq_k, offset, win_left, win_right):
    """[rows, cols]: the key exists (col < seq_k) and lies in the row's window."""
    return (cols[None, :] < seq_k) & in_band(cols[None, :], rows[:, None], offset, win_left, win_right)


@triton.jit
def tanh(x):
    """tanh in float32 to a few ulps everywhere: an odd Taylor polynomial near 0 (where (1 - e) / (1 + e) would
    lose the digits of a small result), (1 - e) / (1 + e) with e = exp(-2|x|) elsewhere. One formula for the GPU and
    Triton's interpreter (which has no libdevice tanh)."""
    a = tl.abs(x)
    e = tl.math.exp2(a * (-2.0 * 1.4426950408889634))
    big = (1.0 - e) / (1.0 + e)
    a2 = a * a
    small = a * (1.0 + a2 * (-0.3333333333333333 + a2 * (0.13333333333333333 + a2 * (-0.05396825396825397
                                                                                   + a2 * 0.021869488536155203))))
    t = tl.where(a < 0.25, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def scaled_scores(qk, qk_scale, cap_log2, SOFTCAP: tl.constexpr):
    """Base-2 scores of a block of q.k dots: qk * qk_scale, or softcapped, tanh(qk * qk_scale) * cap_log2."""
    if SOFTCAP:
        return tanh(qk * qk_scale) * cap_log2
    return qk * qk_scale


@triton.jit
def softmax_step(qk, m_i, l_i, MAY_BE_EMPTY: tl.constexpr):
    """One block of base-2 scores (masked ones -inf) folded into the running max m_i and sum l_i. Returns
    (p, alpha, l_i, m_new): the block's unnormalised weights, the factor that rescales what was accumulated
    before, and the new running sum and max. MAY_BE_EMPTY: some row may have seen no key yet (a mask is applied),
    whose exponents are then taken against 0, not -inf (exp2(-inf - -inf) is NaN)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_ref = m_new
    if MAY_BE_EMPTY:
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_ref[:, None])
    alpha = tl.math.exp2(m_i - m_ref)
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def add_sink(acc, l_i, m_i, sink):
    """Fold a sink logit (base 2, per row or one for all; -inf for none) into the running max and sum: a key every
    row sees whose value vector is zero, so it joins the softmax's denominator only."""
    m_new = tl.maximum(m_i, sink)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_ref)
    return acc * alpha[:, None], l_i * alpha + tl.math.exp2(sink - m_ref), m_new


@triton.jit
def finish_rows(acc, l_i, m_i):
    """(out, lse): acc / l_i, and the natural-log sum-exp. A row that saw no key (all padding, causal with more
    queries than keys, a window that holds no key) gives zeros and lse = -inf, as FA2's varlen kernels do (with a
    sink: zeros, and the sink's logit as lse)."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / LOG2E)
    return out, lse
