"""Hopper forward: the same online-softmax loop as forward.py, with Q, K, V and O moved by tensor descriptors
(TMA on sm90: the copy engine fetches whole tiles, out-of-bounds rows read as zeros and are clipped on store).

It serves the plain case only (no key-padding mask, packed segments, static-cache lengths, dropout or key
splits; 16-bit inputs; head dim 64 or 128; descriptor-legal strides). It is never chosen by itself: the
sm90 table lists it as an autotuning candidate (`TileConfig.tma`), so it runs where it compiles and wins.
"""

import torch
import triton
import triton.language as tl

from .config import TileConfig
from .launch import cdiv
from .online_softmax import LOG2E, finish_rows, key_range, softmax_step, visible_keys

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # a Triton without host-side tensor descriptors: the pointer kernel serves
    TensorDescriptor = None

TMA_HEAD_DIMS = (64, 128)
# (BLOCK_M, BLOCK_N, HEAD_DIM, CAUSAL, num_warps, num_stages, warp_specialize) -> compiled kernel, for inspection (tests read
# shared memory from it).
COMPILED: dict = {}


@triton.jit
def _tma_block(acc, l_i, m_i, q, desc_k, desc_v, b, kv_h, start_n, offs_m, offs_n, qk_scale, seq_k, causal_offset,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr):
    k = desc_k.load([b, kv_h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)  # missing keys read as zeros: masked below
    qk = tl.dot(q, tl.trans(k)) * qk_scale
    if MASK:  # the causal diagonal and the ragged last block
        qk = tl.where(visible_keys(start_n + offs_n, offs_m, seq_k, causal_offset, CAUSAL), qk, float("-inf"))
    p, alpha, l_i, m_new = softmax_step(qk, m_i, l_i, MASK)
    v = desc_v.load([b, kv_h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["seq_q", "seq_k"])
def _flash_fwd_tma_kernel(
    desc_q, desc_k, desc_v, desc_o, LSE, qk_scale, num_heads, group_size, seq_q, seq_k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    kv_h = h // group_size
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    q = desc_q.load([b, h, m0, 0]).reshape(BLOCK_M, HEAD_DIM)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    causal_offset = seq_k - seq_q  # bottom-right: query i sees keys j <= i + offset
    unmasked_hi, hi = key_range(m0, causal_offset, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
    # Warp specialisation (Triton splits the loop into TMA-producer and MMA/softmax-consumer warp groups) where
    # the installed Triton offers it for this loop; the masked tail below stays a plain loop.
    for start_n in tl.range(0, unmasked_hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        acc, l_i, m_i = _tma_block(acc, l_i, m_i, q, desc_k, desc_v, b, kv_h, start_n, offs_m, offs_n, qk_scale,
                                   seq_k, causal_offset, BLOCK_N, HEAD_DIM, False, CAUSAL)
    for start_n in range(unmasked_hi, hi, BLOCK_N):
        acc, l_i, m_i = _tma_block(acc, l_i, m_i, q, desc_k, desc_v, b, kv_h, start_n, offs_m, offs_n, qk_scale,
                                   seq_k, causal_offset, BLOCK_N, HEAD_DIM, True, CAUSAL)

    out, lse = finish_rows(acc, l_i, m_i)
    tl.store(LSE + pid_bh * seq_q + offs_m, lse, mask=offs_m < seq_q)
    desc_o.store([b, h, m0, 0], out.to(q.dtype).reshape(1, 1, BLOCK_M, HEAD_DIM))  # O has q's dtype


def _descriptor_legal(t: torch.Tensor) -> bool:
    """TMA's rules: innermost stride 1, the others and the base address 16-byte aligned."""
    size = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(s * size % 16 == 0 for s in t.stride()[:-1]))


def tma_eligible(q, k, v, *, plain: bool) -> bool:
    """`plain`: no key-padding mask, segments, seqused_k, dropout or key splits."""
    return (plain and TensorDescriptor is not None and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] in TMA_HEAD_DIMS and all(_descriptor_legal(t) for t in (q, k, v)))


def flash_attn_forward_tma(q, k, v, *, causal: bool, scale: float, config: TileConfig, warp_specialize: bool = False):
    batch, heads_q, seq_q, head_dim = q.shape
    heads_k, seq_k = k.shape[1], k.shape[2]
    out = torch.empty((batch, seq_q, heads_q, head_dim), device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty((batch, heads_q, seq_q), device=q.device, dtype=torch.float32)
    bm, bn = config.block_m, config.block_n

    def desc(t, rows):  # over the [B, H, S, D] view as it is strided: no copy for either memory layout
        return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, head_dim])

    compiled = _flash_fwd_tma_kernel[(cdiv(seq_q, bm), batch * heads_q)](
        desc(q, bm), desc(k, bn), desc(v, bn), desc(out, bm), lse, scale * LOG2E.value,
        heads_q, heads_q // heads_k, seq_q, seq_k,
        BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=head_dim, CAUSAL=causal, WARP_SPECIALIZE=warp_specialize,
        num_warps=config.num_warps, num_stages=config.num_stages)
    COMPILED[(bm, bn, head_dim, causal, config.num_warps, config.num_stages, warp_specialize)] = compiled
    return out, lse
