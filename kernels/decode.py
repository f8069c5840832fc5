"""Flash-decoding: few query tokens against a long KV cache.

One program per (key split, batch x KV head). It holds every query row of its GQA group (group
size x query tokens, up to 16 tokens) as one tile, so each K/V byte is read from memory once,
and writes a float32 partial result that `_combine_splits_kernel` merges by log-sum-exp (with a
single split it writes the result itself: one launch).
The valid key count may come from a device tensor (`seqused_k`): a static cache's step then
needs no host sync, and the launch (grid from the buffer's length) can be captured in a CUDA graph.
"""

import torch
import triton
import triton.language as tl

from .config import TileConfig, decode_rows
from .forward import LOG2E, combine_splits
from .launch import CachedLauncher, cdiv, next_power_of_2


# Lengths change every decode step: specialising on them (== 1, multiple of 16) would compile new variants
# mid-generation whenever a step meets an unseen combination.
@triton.jit(do_not_specialize=["seq_q", "seq_k", "split_len"])
def _flash_decode_kernel(
    Q, K, V, O_PART, LSE_PART, KPM, SEQUSED,
    qk_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ps, stride_pb, stride_pm, stride_ph,
    stride_ls, stride_mb, stride_mn,
    num_heads_k, group_size, seq_q, seq_k, head_dim, split_len,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEQUSED: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads_k
    kv_h = pid_bh % num_heads_k

    # Row r of the tile is query token r // group of query head kv_h * group + r % group.
    rows = tl.arange(0, BLOCK_R)
    tok = rows // group_size
    head = kv_h * group_size + rows % group_size
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = tok < seq_q
    q_mask = row_ok[:, None] & (offs_d[None, :] < head_dim)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + head[:, None] * stride_qh + tok[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)

    kv_len = seq_k
    if HAS_SEQUSED:
        kv_len = tl.minimum(tl.load(SEQUSED + b), seq_k)
    lo = pid_s * split_len
    hi = tl.minimum(lo + split_len, kv_len)
    causal_offset = kv_len - seq_q  # bottom-right: token t sees keys j <= t + kv_len - seq_q

    k_base = K + b.to(tl.int64) * stride_kb + kv_h * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kv_h * stride_vh
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        in_range = cols < hi
        if EVEN_D:
            k = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                        mask=in_range[None, :], other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=in_range[:, None], other=0.0)
        else:
            d_ok = offs_d < head_dim
            k = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                        mask=in_range[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=in_range[:, None] & d_ok[None, :], other=0.0)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        visible = in_range[None, :] & row_ok[:, None]
        if CAUSAL:
            visible = visible & (cols[None, :] <= tok[:, None] + causal_offset)
        if HAS_KPM:
            keep = tl.load(KPM + b * stride_mb + cols * stride_mn, mask=in_range, other=0) != 0
            visible = visible & keep[None, :]
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.math.exp2(qk - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
    tl.store(LSE_PART + pid_s * stride_ls + (b * num_heads_k * group_size + head) * seq_q + tok, lse, mask=row_ok)
    tl.store(O_PART + pid_s * stride_ps + b.to(tl.int64) * stride_pb + tok[:, None] * stride_pm
             + head[:, None] * stride_ph + offs_d[None, :], out.to(O_PART.dtype.element_ty), mask=q_mask)


_launch_decode = CachedLauncher(_flash_decode_kernel)


def flash_decode_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    key_padding_mask: torch.Tensor | None,
    seqused_k: torch.Tensor | None,
    config: TileConfig,
    num_splits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `flash_attn_forward`, for the shapes `uses_decode_kernel` accepts.

    The split count and grid depend only on shapes (the buffer length), never on `seqused_k`'s values.
    """
    batch, heads_q, seq_q, head_dim = q.shape
    heads_k, seq_k = k.shape[1], k.shape[2]
    group = heads_q // heads_k
    out = torch.empty((batch, seq_q, heads_q, head_dim), device=q.device, dtype=q.dtype).transpose(1, 2)
    block_d = max(16, next_power_of_2(head_dim))
    split_len = cdiv(cdiv(seq_k, num_splits), config.block_n) * config.block_n
    num_splits = cdiv(seq_k, split_len)
    rows = batch * heads_q * seq_q
    if num_splits == 1:  # one program per KV head sees every key: write the result, no combine launch
        lse = torch.empty((batch, heads_q, seq_q), device=q.device, dtype=torch.float32)
        o_part, lse_part = out, lse  # out's memory is [B, Sq, H, D]: the partials' layout with one split
    else:  # one float32 allocation for the partials, their log-sum-exps and the final lse (host time counts here)
        work = torch.empty(rows * (num_splits * (head_dim + 1) + 1), device=q.device, dtype=torch.float32)
        o_part = work[:num_splits * rows * head_dim].view(num_splits, batch, seq_q, heads_q, head_dim)
        lse_part = work[num_splits * rows * head_dim:num_splits * rows * (head_dim + 1)].view(
            num_splits, batch, heads_q, seq_q)
        lse = work[num_splits * rows * (head_dim + 1):].view(batch, heads_q, seq_q)
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(torch.uint8)
        stride_mb, stride_mn = kpm.stride()
    else:
        kpm, stride_mb, stride_mn = lse, 0, 0  # never read
    seqused = seqused_k if seqused_k is not None else lse  # never read without HAS_SEQUSED

    _launch_decode(
        (num_splits, batch * heads_k, 1),
        q, k, v, o_part, lse_part, kpm, seqused,
        scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(),
        rows * head_dim, seq_q * heads_q * head_dim, heads_q * head_dim, head_dim,  # partials: [S, B, Sq, H, D]
        rows, stride_mb, stride_mn,  # lse partials: [S, B, H, Sq]
        heads_k, group, seq_q, seq_k, head_dim, split_len,
        BLOCK_R=decode_rows(seq_q, group), BLOCK_N=config.block_n, BLOCK_D=block_d,
        CAUSAL=causal, HAS_KPM=key_padding_mask is not None, HAS_SEQUSED=seqused_k is not None,
        EVEN_D=block_d == head_dim, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if num_splits > 1:
        combine_splits(o_part, lse_part, out, lse, block_d)
    return out, lse
