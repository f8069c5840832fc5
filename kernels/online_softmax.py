"""Pieces the whole-tile forward kernels share (forward_tma.py, forward_fp8.py): which key blocks a query tile
visits, and one online-softmax step over a block's scores."""

import triton
import triton.language as tl


@triton.jit
def key_range(m0, causal_offset, seq_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(unmasked_hi, hi) for the query tile starting at row m0: blocks below unmasked_hi need no mask;
    [unmasked_hi, hi) hold the causal diagonal and the ragged tail. Causal alignment is bottom-right: query i sees
    keys j <= i + causal_offset (seq_k - seq_q)."""
    hi = seq_k
    unmasked_hi = seq_k
    if CAUSAL:
        hi = tl.minimum(seq_k, m0 + BLOCK_M + causal_offset)
        unmasked_hi = tl.minimum(seq_k, m0 + causal_offset + 1)
    hi = tl.maximum(hi, 0)
    return tl.minimum(tl.maximum(unmasked_hi, 0) // BLOCK_N * BLOCK_N, hi), hi


@triton.jit
def softmax_step(qk, m_i, l_i, cols, offs_m, seq_k, causal_offset, MASK: tl.constexpr, CAUSAL: tl.constexpr):
    """Masks a block's scores (base-2, scaled) where MASK, then returns (p, alpha, l_i, m_new): the block's
    unnormalised weights, the factor that rescales what was accumulated before, and the running sum and max."""
    if MASK:  # the causal diagonal and the ragged last block
        visible = cols[None, :] < seq_k
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + causal_offset)
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_ref = m_new
    if MASK:  # a row may have seen nothing yet: exponents against 0, not -inf
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_ref[:, None])
    alpha = tl.math.exp2(m_i - m_ref)
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_new
