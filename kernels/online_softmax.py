"""The pieces every forward kernel shares: which key blocks a query tile visits, the causal/ragged mask of a block,
one online-softmax step, and the epilogue that normalises the rows and gives their log-sum-exp.

Scores are scaled into base 2 once (qk_scale = softmax scale * LOG2E), so the kernels use exp2/log2; the lse they
return is in natural log, as SDPA's and FA2's are.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e); `LOG2E.value` on the host


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
def finish_rows(acc, l_i, m_i):
    """(out, lse): acc / l_i, and the natural-log sum-exp. A row that saw no key (all padding, or causal with
    more queries than keys) gives zeros and lse = -inf, as FA2's varlen kernels do."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / LOG2E)
    return out, lse
