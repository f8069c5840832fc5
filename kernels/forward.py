"""Flash-attention forward: one Triton program per (query tile, batch x head).

Reads top to bottom like Triton's fused-attention tutorial, plus what Hugging Face
models need: GQA/MQA by index arithmetic, bottom-right causal alignment for Sq != Sk,
a [batch, Sk] key-padding mask, head dims that are not powers of two, any strides, sliding
windows (key blocks outside a tile's band are skipped, blocks on its edges masked), tanh
softcapping of the scores and per-head sink logits. Each feature is a constexpr: a call
without it compiles as if it did not exist.
"""

import torch
import triton
import triton.language as tl

from .config import TileConfig
from .forward_tma import flash_attn_forward_tma, tma_eligible
from .launch import CachedLauncher, cdiv, next_power_of_2
from .online_softmax import (LOG2E, add_sink, band_keys, finish_rows, kernel_window, key_range, scaled_scores,
                             softmax_step, visible_keys, window_key_range)

@triton.jit
def dropout_keep(seed, row_head, rows, cols, seq_k, dropout_p):
    """Counter-based keep mask (Philox): a function of (seed, query head, row, column) only, so the
    backward regenerates exactly the forward's mask. Each (batch, query head) gets its own stream."""
    return tl.rand(seed + row_head, rows[:, None] * seq_k + cols[None, :]) >= dropout_p


@triton.jit
def same_segment(seg_base, rows, cols, seq_len):
    """[rows, cols]: query and key belong to the same packed sequence (segment ids, Sq == Sk)."""
    seg_q = tl.load(seg_base + rows, mask=rows < seq_len, other=-2)
    seg_k = tl.load(seg_base + cols, mask=cols < seq_len, other=-1)
    return seg_q[:, None] == seg_k[None, :]


@triton.jit
def segment_span(seg_base, stride_sp, first, count, seq_len, BLOCK: tl.constexpr):
    """[lo, hi): the positions whose segment ids the `count` positions from `first` can share, from
    `segment_planes`' run bounds; lo rounded down to a multiple of BLOCK (the loops' step). Blocks outside it are
    skipped: for packed sequences a tile meets only its own sequences' blocks."""
    lo = tl.load(seg_base + stride_sp + first)
    hi = tl.load(seg_base + 2 * stride_sp + tl.minimum(first + count, seq_len) - 1)
    return lo // BLOCK * BLOCK, hi


_LAST_PLANES: list = []  # [(segment ids tensor, its version, planes)]: the last ids seen, held (so never reused)


def segment_planes(segment_ids: torch.Tensor) -> torch.Tensor:
    """int32 [3, B, S] for the kernels' SEG argument: the segment ids, then for each position the first and one past
    the last position of its run of equal ids. In a row whose ids never decrease (packed sequences numbered in
    order) a run is a whole segment, so a tile's runs bound the keys it can see; a row whose ids do decrease gets
    [0, S) for every position (nothing skipped, the kernels' per-element test alone).

    Every layer of a model's step gets the same ids tensor (transformers builds the mask once per forward), in the
    forward and again in the backward: the planes of the last one are kept and reused while it is unchanged (same
    object, same version counter). Not while a CUDA graph is captured, nor for inference tensors (no version)."""
    try:
        capturing = segment_ids.is_cuda and torch.cuda.is_current_stream_capturing()
        version = None if capturing else segment_ids._version
    except RuntimeError:  # an inference-mode tensor keeps no version counter
        version = None
    if version is not None and _LAST_PLANES and _LAST_PLANES[0][0] is segment_ids \
            and _LAST_PLANES[0][1] == version:
        return _LAST_PLANES[0][2]
    seg = segment_ids.to(torch.int32).contiguous()
    batch, seq = seg.shape
    planes = torch.empty((3, batch, seq), device=seg.device, dtype=torch.int32)
    planes[0] = seg
    ordered = (seg[:, 1:] >= seg[:, :-1]).all(dim=1, keepdim=True)
    planes[1] = torch.where(ordered, torch.searchsorted(seg, seg, side="left", out_int32=True), 0)
    planes[2] = torch.where(ordered, torch.searchsorted(seg, seg, side="right", out_int32=True), seq)
    if version is not None:
        _LAST_PLANES[:] = [(segment_ids, version, planes)]
    return planes


@triton.jit
def _attend_block(
    acc, l_i, m_i, q,
    k_base, v_base, kpm_base, seg_base,
    start_n, offs_m, offs_n, offs_d,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
    qk_scale, seq_k, head_dim, causal_offset, seed, row_head, dropout_p, cap_log2, win_left, win_right,
    BOUNDARY: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr,
    WINDOW: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) with keys [start_n, start_n + BLOCK_N). BOUNDARY: the block may
    hold keys a row must not see (the causal diagonal, a window's edge, the ragged tail): they are masked."""
    cols = start_n + offs_n
    k_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd
    if BOUNDARY:
        k = tl.load(k_ptrs, mask=(cols[None, :] < seq_k) & (offs_d[:, None] < head_dim), other=0.0)
    elif EVEN_D:
        k = tl.load(k_ptrs)
    else:
        k = tl.load(k_ptrs, mask=offs_d[:, None] < head_dim, other=0.0)
    qk = scaled_scores(tl.dot(q, k, input_precision=DOT_PRECISION), qk_scale, cap_log2, SOFTCAP)

    # Masked scores become -inf; a row can then be -inf throughout this block (or all blocks): softmax_step
    # takes its exponents against 0.
    if BOUNDARY:
        if WINDOW:  # a band edge and the ragged last block
            qk = tl.where(band_keys(cols, offs_m, seq_k, causal_offset, win_left, win_right), qk, float("-inf"))
        else:  # the causal diagonal and the ragged last block
            qk = tl.where(visible_keys(cols, offs_m, seq_k, causal_offset, CAUSAL), qk, float("-inf"))
    if HAS_KPM:
        keep = tl.load(kpm_base + cols * stride_mn, mask=cols < seq_k, other=0) != 0
        qk = tl.where(keep[None, :], qk, float("-inf"))
    if HAS_SEG:
        qk = tl.where(same_segment(seg_base, offs_m, cols, seq_k), qk, float("-inf"))
    MAY_MASK: tl.constexpr = BOUNDARY or HAS_KPM or HAS_SEG
    p, alpha, l_i, m_new = softmax_step(qk, m_i, l_i, MAY_MASK)
    if DROPOUT:  # the normaliser uses every probability; only the weights applied to V are dropped
        p = tl.where(dropout_keep(seed, row_head, offs_m, cols, seq_k, dropout_p), p / (1.0 - dropout_p), 0.0)

    if BOUNDARY:
        v = tl.load(v_ptrs, mask=(cols[:, None] < seq_k) & (offs_d[None, :] < head_dim), other=0.0)
    elif EVEN_D:
        v = tl.load(v_ptrs)
    else:
        v = tl.load(v_ptrs, mask=offs_d[None, :] < head_dim, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["seq_q", "seq_k", "split_len", "seed"])  # see decode.py: no variants per length
def _flash_fwd_kernel(
    Q, K, V, O, LSE, KPM, SEQUSED, SEG, SINKS,
    qk_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mn, stride_sb, stride_sp,
    num_heads, group_size, seq_q, seq_k, head_dim,
    split_len, stride_os, stride_ls, dropout_p, cap_log2, win_left, win_right, seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEQUSED: tl.constexpr, HAS_SEG: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr, STORE_LSE: tl.constexpr,
    SOFTCAP: tl.constexpr = False, WINDOW: tl.constexpr = False, HAS_SINKS: tl.constexpr = False,
):
    """One program per (query tile, batch x head, key split). WINDOW (with CAUSAL False: causal is the window's
    right = 0): the key loop runs over the tile's band only, its edge blocks masked. HAS_SINKS: SINKS [Hq] holds
    one logit per query head that joins each row's softmax (split 0 adds it)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)  # split of the key range (flash-decoding); 0 when not split
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    kv_h = h // group_size  # GQA: query head h reads K/V head h // group, no repeat_kv copy

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q_mask = offs_m[:, None] < seq_q
    if not EVEN_D:
        q_mask = q_mask & (offs_d[None, :] < head_dim)
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)

    k_base = K + b.to(tl.int64) * stride_kb + kv_h * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kv_h * stride_vh
    kpm_base = KPM + b * stride_mb
    seg_base = SEG + b * stride_sb
    if HAS_SEQUSED:  # a static cache: only the first seqused_k[b] keys of the buffer hold tokens
        seq_k = tl.minimum(tl.load(SEQUSED + b), seq_k)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    causal_offset = seq_k - seq_q  # bottom-right: query i sees keys j <= i + (seq_k - seq_q)
    if WINDOW:
        split_lo = pid_s * split_len  # this program's share of the keys (flash-decoding splits)
        split_hi = split_lo + split_len
        # Blocks of the tile's band only: edge blocks masked, the whole blocks between them not.
        lo, full_lo, full_hi, hi = window_key_range(pid_m * BLOCK_M, causal_offset, seq_k, win_left, win_right,
                                                    BLOCK_M, BLOCK_N)
        for start_n in range(tl.maximum(lo, split_lo), tl.minimum(full_lo, split_hi), BLOCK_N):
            acc, l_i, m_i = _attend_block(
                acc, l_i, m_i, q, k_base, v_base, kpm_base, seg_base, start_n, offs_m, offs_n, offs_d,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
                qk_scale, seq_k, head_dim, causal_offset, seed, pid_bh, dropout_p, cap_log2, win_left, win_right,
                True, False, HAS_KPM, HAS_SEG, EVEN_D, DOT_PRECISION, DROPOUT, SOFTCAP, True,
            )
        for start_n in range(tl.maximum(full_lo, split_lo), tl.minimum(full_hi, split_hi), BLOCK_N):
            acc, l_i, m_i = _attend_block(
                acc, l_i, m_i, q, k_base, v_base, kpm_base, seg_base, start_n, offs_m, offs_n, offs_d,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
                qk_scale, seq_k, head_dim, causal_offset, seed, pid_bh, dropout_p, cap_log2, win_left, win_right,
                False, False, HAS_KPM, HAS_SEG, EVEN_D, DOT_PRECISION, DROPOUT, SOFTCAP, True,
            )
        for start_n in range(tl.maximum(full_hi, split_lo), tl.minimum(hi, split_hi), BLOCK_N):
            acc, l_i, m_i = _attend_block(
                acc, l_i, m_i, q, k_base, v_base, kpm_base, seg_base, start_n, offs_m, offs_n, offs_d,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
                qk_scale, seq_k, head_dim, causal_offset, seed, pid_bh, dropout_p, cap_log2, win_left, win_right,
                True, False, HAS_KPM, HAS_SEG, EVEN_D, DOT_PRECISION, DROPOUT, SOFTCAP, True,
            )
    else:
        unmasked_hi, hi = key_range(pid_m * BLOCK_M, causal_offset, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
        lo = pid_s * split_len  # this program's share of the keys (flash-decoding splits), a multiple of BLOCK_N
        hi = tl.minimum(hi, lo + split_len)
        if HAS_SEG:  # only the key blocks of the tile's own sequences
            seg_lo, seg_hi = segment_span(seg_base, stride_sp, pid_m * BLOCK_M, BLOCK_M, seq_q, BLOCK_N)
            lo = tl.maximum(lo, seg_lo)
            hi = tl.minimum(hi, seg_hi)
            unmasked_hi = tl.minimum(unmasked_hi, hi // BLOCK_N * BLOCK_N)  # the masked loop starts on a block
        unmasked_hi = tl.maximum(tl.minimum(unmasked_hi, hi), lo)

        for start_n in range(lo, unmasked_hi, BLOCK_N):
            acc, l_i, m_i = _attend_block(
                acc, l_i, m_i, q, k_base, v_base, kpm_base, seg_base, start_n, offs_m, offs_n, offs_d,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
                qk_scale, seq_k, head_dim, causal_offset, seed, pid_bh, dropout_p, cap_log2, win_left, win_right,
                False, CAUSAL, HAS_KPM, HAS_SEG, EVEN_D, DOT_PRECISION, DROPOUT, SOFTCAP, False,
            )
        for start_n in range(unmasked_hi, hi, BLOCK_N):
            acc, l_i, m_i = _attend_block(
                acc, l_i, m_i, q, k_base, v_base, kpm_base, seg_base, start_n, offs_m, offs_n, offs_d,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
                qk_scale, seq_k, head_dim, causal_offset, seed, pid_bh, dropout_p, cap_log2, win_left, win_right,
                True, CAUSAL, HAS_KPM, HAS_SEG, EVEN_D, DOT_PRECISION, DROPOUT, SOFTCAP, False,
            )

    if HAS_SINKS:  # once per row: split 0 carries it, the merge weighs it in with that split's lse
        sink = tl.load(SINKS + h).to(tl.float32) * LOG2E
        acc, l_i, m_i = add_sink(acc, l_i, m_i, tl.where(pid_s == 0, sink, float("-inf")))
    out, lse = finish_rows(acc, l_i, m_i)
    if STORE_LSE:
        tl.store(LSE + pid_s * stride_ls + pid_bh * seq_q + offs_m, lse, mask=offs_m < seq_q)
    o_ptrs = O + pid_s * stride_os + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=q_mask)


@triton.jit(do_not_specialize=["num_splits", "seq_q"])
def _combine_splits_kernel(
    O_PART, LSE_PART, O, LSE,
    num_splits, seq_q, num_heads, head_dim,
    stride_ps, stride_pb, stride_pm, stride_ph,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_ls,
    BLOCK_D: tl.constexpr,
):
    """out = sum_s exp(lse_s - lse) * out_s, lse = logsumexp_s lse_s, for one (batch, head, query row).
    Loops over the splits, so one compiled variant serves every split count."""
    row = tl.program_id(0)
    bh = row // seq_q
    m = row % seq_q
    b = bh // num_heads
    h = bh % num_heads
    offs_d = tl.arange(0, BLOCK_D)
    top = tl.full([], float("-inf"), tl.float32)
    for s in range(0, num_splits):
        top = tl.maximum(top, tl.load(LSE_PART + s * stride_ls + row))
    top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    part_base = O_PART + b * stride_pb + m * stride_pm + h * stride_ph
    for s in range(0, num_splits):
        w = tl.math.exp(tl.load(LSE_PART + s * stride_ls + row) - top)
        total += w
        acc += w * tl.load(part_base + s * stride_ps + offs_d, mask=offs_d < head_dim, other=0.0)
    out = acc / tl.where(total == 0.0, 1.0, total)
    tl.store(O + b * stride_ob + h * stride_oh + m * stride_om + offs_d * stride_od,
             out.to(O.dtype.element_ty), mask=offs_d < head_dim)
    tl.store(LSE + row, tl.where(total == 0.0, float("-inf"), top + tl.math.log(tl.where(total == 0.0, 1.0, total))))


_launch_forward = CachedLauncher(_flash_fwd_kernel)
_launch_combine = CachedLauncher(_combine_splits_kernel)


def combine_splits(o_part, lse_part, out, lse, block_d: int) -> None:
    """Merge float32 partials o_part [S, B, Sq, H, D] / lse_part [S, B, H, Sq] into out and lse."""
    num_splits, batch, seq_q, heads, head_dim = o_part.shape
    _launch_combine(
        (batch * heads * seq_q, 1, 1),
        o_part, lse_part, out, lse,
        num_splits, seq_q, heads, head_dim,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), o_part.stride(3),
        *out.stride(), lse_part.stride(0),
        BLOCK_D=block_d,
    )


class ForwardPlan:
    """A launch of the forward kernel worked out once for what a call signature fixes: shapes, q's strides, dtype,
    flags, tiles and key splits. `run` binds one call's tensors (and K/V's strides, the mask's and the seed), so a
    call costs little host time: a 512-token prefill's attention runs for tens of microseconds on an H100, and the
    general launch path (a key over ~45 arguments, the tile choice, two allocations) took 130 us of host time per call
    on an H100 host, planned 48 us (scripts/attention_host_time.py).

    need_lse=False (inference) neither allocates nor writes the lse, unless key splits need it to merge.
    """

    kernel = "portable"

    def __init__(self, q_shape, q_stride, k_shape, dtype: torch.dtype, *, causal: bool, scale: float,
                 config: TileConfig, has_kpm: bool = False, has_seqused: bool = False, has_seg: bool = False,
                 num_splits: int = 1, dropout_p: float = 0.0, need_lse: bool = True, window=None,
                 softcap: float = 0.0, has_sinks: bool = False):
        batch, heads_q, seq_q, head_dim = q_shape
        heads_k, seq_k = k_shape[1], k_shape[2]
        self.dtype, self.need_lse = dtype, need_lse
        block_d = max(16, next_power_of_2(head_dim))
        split_len = cdiv(cdiv(seq_k, num_splits), config.block_n) * config.block_n
        self.num_splits = splits = cdiv(seq_k, split_len) if seq_k else 1
        self.block_d = block_d
        self.out_shape, self.lse_shape = (batch, seq_q, heads_q, head_dim), (batch, heads_q, seq_q)
        self.grid = (cdiv(seq_q, config.block_m), batch * heads_q, splits)
        # O (and each split's float32 partial) is [B, Sq, H, D] in memory, strides given in [B, H, Sq, D] order.
        out_stride = (seq_q * heads_q * head_dim, head_dim, heads_q * head_dim, 1)
        rows = batch * heads_q * seq_q
        band = kernel_window(causal, window)
        win_left, win_right = band or (0, 0)
        qk_scale, cap_log2 = (scale / softcap, softcap * LOG2E.value) if softcap else (scale * LOG2E.value, 0.0)
        self.head_scalars = (qk_scale, *q_stride)
        self.out_scalars = out_stride
        self.tail_scalars = (heads_q, heads_q // heads_k, seq_q, seq_k, head_dim, split_len,
                             rows * head_dim if splits > 1 else 0, rows if splits > 1 else 0, float(dropout_p),
                             float(cap_log2), win_left, win_right)
        self.constexprs = dict(
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=block_d, CAUSAL=causal and band is None,
            HAS_KPM=has_kpm, HAS_SEQUSED=has_seqused, HAS_SEG=has_seg, EVEN_D=block_d == head_dim,
            DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", DROPOUT=dropout_p > 0,
            STORE_LSE=need_lse or splits > 1, SOFTCAP=bool(softcap), WINDOW=band is not None, HAS_SINKS=has_sinks,
            num_warps=config.num_warps, num_stages=config.num_stages)
        self.variants: dict = {}  # compiled kernels (CachedLauncher.launch_planned)

    def run(self, q, k, v, key_padding_mask=None, seqused_k=None, segment_ids=None, seed: int = 0, sinks=None):
        """(out [B, Sq, Hq, D] (transformers' layout; `.transpose(1, 2)` is SDPA's), lse [B, Hq, Sq] or None).
        sinks: [Hq] logits, for a plan made with has_sinks."""
        device = q.device
        out = torch.empty(self.out_shape, device=device, dtype=self.dtype)
        lse = torch.empty(self.lse_shape, device=device, dtype=torch.float32) if self.need_lse else None
        splits = self.num_splits
        if splits > 1:
            o_dst = torch.empty((splits, *self.out_shape), device=device, dtype=torch.float32)
            lse_dst = torch.empty((splits, *self.lse_shape), device=device, dtype=torch.float32)
        else:
            o_dst, lse_dst = out, (lse if lse is not None else out)  # never written without STORE_LSE
        if key_padding_mask is not None:
            kpm = key_padding_mask.view(torch.uint8)
            stride_mb, stride_mn = kpm.stride()
        else:
            kpm, stride_mb, stride_mn = out, 0, 0  # never read without HAS_KPM
        seg, stride_sb, stride_sp = out, 0, 0  # never read without HAS_SEG
        if segment_ids is not None:
            seg = segment_planes(segment_ids)
            stride_sp, stride_sb = seg.stride(0), seg.stride(1)
        kv_strides = (*k.stride(), *v.stride())
        mask_strides = (stride_mb, stride_mn, stride_sb, stride_sp)
        _launch_forward.launch_planned(
            self.variants, self.grid,
            (q, k, v, o_dst, lse_dst, kpm, out if seqused_k is None else seqused_k,
             seg, out if sinks is None else sinks),
            (*self.head_scalars, *kv_strides, *self.out_scalars, *mask_strides, *self.tail_scalars, seed),
            self.constexprs, (*kv_strides, *mask_strides, seed))
        if splits > 1:
            if lse is None:
                lse = torch.empty(self.lse_shape, device=device, dtype=torch.float32)
            combine_splits(o_dst, lse_dst, out.transpose(1, 2), lse, self.block_d)
            if not self.need_lse:
                lse = None
        return out, lse


def flash_attn_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    key_padding_mask: torch.Tensor | None,
    config: TileConfig,
    seqused_k: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    num_splits: int = 1,
    dropout_p: float = 0.0,
    seed: int = 0,
    need_lse: bool = True,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the forward on validated [B, H, S, D] tensors.

    Returns (out, lse): out is [B, Hq, Sq, D] stored as [B, Sq, Hq, D] in memory (what
    transformers wants after its transpose, so that transpose costs nothing), lse is
    [B, Hq, Sq] float32 natural-log sum-exp of the scaled scores (-inf for empty rows), None with
    need_lse=False. num_splits > 1 splits the key range across programs (flash-decoding: few query rows, long
    caches) and combines the float32 partial results by their log-sum-exp. dropout_p > 0 drops
    attention weights with a Philox mask drawn from `seed` (lse stays the undropped one).
    seqused_k (int32 [B], on the device): only keys below seqused_k[b] exist, and causal alignment is to it.
    segment_ids (contiguous int32 [B, S], Sq == Sk == S): packed sequences; a query sees keys of its own segment only.
    window ((left, right), -1 = unbounded), softcap (> 0, or 0 for none), sinks ([Hq] logits): as `attention`'s;
    the lse then includes the sink.
    One call's `ForwardPlan`, or the TMA kernel where the config asks for it and the call allows it.
    """
    plain = (key_padding_mask is None and seqused_k is None and segment_ids is None and dropout_p == 0.0
             and kernel_window(causal, window) is None and not softcap and sinks is None)
    if config.tma and plain and num_splits == 1 and tma_eligible(q, k, v, plain=True):
        out, lse = flash_attn_forward_tma(q, k, v, causal=causal, scale=scale, config=config,
                                          warp_specialize=config.warp_specialize)
        return out, (lse if need_lse else None)
    plan = ForwardPlan(q.shape, q.stride(), k.shape, q.dtype, causal=causal, scale=scale, config=config,
                       has_kpm=key_padding_mask is not None, has_seqused=seqused_k is not None,
                       has_seg=segment_ids is not None, num_splits=num_splits, dropout_p=dropout_p, need_lse=need_lse,
                       window=window, softcap=softcap, has_sinks=sinks is not None)
    out, lse = plan.run(q, k, v, key_padding_mask, seqused_k, segment_ids, seed, sinks)
    return out.transpose(1, 2), lse
