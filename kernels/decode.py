"""Flash-decoding: few query tokens against a long KV cache.

One program per (key split, batch x KV head). It holds every query row of its GQA group (group
size x query tokens, up to 16 tokens) as one tile, so each K/V byte is read from memory once.
With several splits each program writes a float32 partial result, and the last program of a
(batch, KV head) to finish merges them by log-sum-exp: one launch either way, because on the
host a second launch costs more than a short cache's attention does on the GPU.
The valid key count may come from a device tensor (`seqused_k`): a static cache's step then
needs no host sync, and the launch (grid from the buffer's length) can be captured in a CUDA graph.
Sliding windows (each program's key loop clamped to the band of its rows; splits are laid out over
the whole buffer, so those outside the band finish at once), softcapping and sinks (split 0 adds a
row's sink, the merge weighs it in) are constexpr features, as in the forward kernel.
"""

import threading

import torch
import triton
import triton.language as tl

from .config import TileConfig, decode_rows, decode_splits
from .online_softmax import LOG2E, add_sink, finish_rows, in_band, kernel_window, scaled_scores, softmax_step
from .launch import CachedLauncher, _current_stream, cdiv, next_power_of_2


# Lengths change every decode step: specialising on them (== 1, multiple of 16) would compile new variants
# mid-generation whenever a step meets an unseen combination.
@triton.jit(do_not_specialize=["seq_q", "seq_k", "split_len"])
def _flash_decode_kernel(
    Q, K, V, O, LSE, WORK, COUNTERS, KPM, SEQUSED, SINKS,
    qk_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    num_heads_k, group_size, seq_q, seq_k, head_dim, split_len, cap_log2, win_left, win_right,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEQUSED: tl.constexpr, EVEN_D: tl.constexpr,
    SPLIT: tl.constexpr, STORE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr, MERGE_UNROLL: tl.constexpr,
    SOFTCAP: tl.constexpr = False, WINDOW: tl.constexpr = False, HAS_SINKS: tl.constexpr = False,
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
    if WINDOW:  # the band of tokens 0 .. seq_q - 1: key blocks outside it are skipped
        lo = tl.maximum(lo, tl.maximum(causal_offset - win_left, 0) // BLOCK_N * BLOCK_N)
        hi = tl.minimum(hi, seq_q + causal_offset + win_right)

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
        qk = scaled_scores(tl.dot(q, k, input_precision=DOT_PRECISION), qk_scale, cap_log2, SOFTCAP)
        visible = in_range[None, :] & row_ok[:, None]
        if CAUSAL:
            visible = visible & (cols[None, :] <= tok[:, None] + causal_offset)
        if WINDOW:
            visible = visible & in_band(cols[None, :], tok[:, None], causal_offset, win_left, win_right)
        if HAS_KPM:
            keep = tl.load(KPM + b * stride_mb + cols * stride_mn, mask=in_range, other=0) != 0
            visible = visible & keep[None, :]
        qk = tl.where(visible, qk, float("-inf"))
        p, alpha, l_i, m_i = softmax_step(qk, m_i, l_i, True)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)

    if HAS_SINKS:  # once per row: split 0 carries it, the merge weighs it in with that split's lse
        sink = tl.load(SINKS + head, mask=row_ok, other=float("-inf")).to(tl.float32) * LOG2E
        acc, l_i, m_i = add_sink(acc, l_i, m_i, tl.where(pid_s == 0, sink, float("-inf")))
    out, lse = finish_rows(acc, l_i, m_i)
    # O is [B, Sq, H, D] in memory and LSE [B, H, Sq]; WORK (float32) holds the splits' partials in the same
    # layouts, [S, B, Sq, H, D] then [S, B, H, Sq]. COUNTERS: one float32 arrival count per (batch, KV head), zero
    # at launch; the merging program puts its own back to zero, so a cached buffer stays ready for the next launch.
    heads_q = num_heads_k * group_size
    rows_total = tl.num_programs(1) * group_size * seq_q  # batch x Hq x Sq
    o_offs = (b.to(tl.int64) * seq_q * heads_q + tok[:, None] * heads_q + head[:, None]) * head_dim + offs_d[None, :]
    lse_offs = (b * heads_q + head) * seq_q + tok
    if SPLIT:
        num_splits = tl.num_programs(0)
        o_part = WORK + o_offs
        lse_part = WORK + num_splits * rows_total * head_dim + lse_offs
        counter = COUNTERS + pid_bh
        tl.store(o_part + pid_s * rows_total * head_dim, out, mask=q_mask)
        tl.store(lse_part + pid_s * rows_total, lse, mask=row_ok)
        # The last split of this (batch, KV head) to arrive merges them all. Its acquire of the counter pairs with
        # the other splits' release after their stores (the barrier first gathers every thread's stores into
        # the release). Float32 counts are exact this small.
        tl.debug_barrier()
        arrived = tl.atomic_add(counter, 1.0, sem="acq_rel")
        if arrived == num_splits - 1:
            out, lse = _merge_partials(o_part, lse_part, rows_total * head_dim, rows_total, num_splits, q_mask,
                                       row_ok, BLOCK_R, BLOCK_D, MERGE_UNROLL)
            tl.store(O + o_offs, out.to(O.dtype.element_ty), mask=q_mask)
            if STORE_LSE:
                tl.store(LSE + lse_offs, lse, mask=row_ok)
            tl.store(counter, 0.0)  # every split has arrived: nothing else touches it in this launch
    else:
        tl.store(O + o_offs, out.to(O.dtype.element_ty), mask=q_mask)
        if STORE_LSE:
            tl.store(LSE + lse_offs, lse, mask=row_ok)


@triton.jit
def _merge_partials(o_part, lse_part, stride_o, stride_lse, num_splits, q_mask, row_ok,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, UNROLL: tl.constexpr):
    """out = sum_s exp(lse_s - lse) * out_s and lse = logsumexp_s lse_s, row by row, with a running maximum.
    Loads go to L2 (.cg): other SMs wrote the partials during this launch. Unrolled, so that several splits'
    loads are in flight at once: this runs after the last split's keys, while the memory system idles."""
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for s in tl.range(0, num_splits, loop_unroll_factor=UNROLL):
        lse_s = tl.load(lse_part + s * stride_lse, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
        m_new = tl.maximum(m, lse_s)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp(m - m_ref)
        w = tl.math.exp(lse_s - m_ref)
        o_s = tl.load(o_part + s * stride_o, mask=q_mask, other=0.0, cache_modifier=".cg")
        acc = acc * alpha[:, None] + w[:, None] * o_s
        total = total * alpha + w
        m = m_new
    empty = total == 0.0
    out = acc / tl.where(empty, 1.0, total)[:, None]
    return out, tl.where(empty, float("-inf"), m + tl.math.log(tl.where(empty, 1.0, total)))


_launch_decode = CachedLauncher(_flash_decode_kernel)
MERGE_UNROLL = 4  # splits merged per loop step

# (device, stream) -> (counters, work): views of one float32 allocation made outside any CUDA-graph pool. The
# arrival counters are zero between launches (the merging programs leave them so); the work part holds the splits'
# partials, which every launch writes before it reads, so reusing it needs no zeroing and saves an allocation per
# call. Per stream, so that launches running concurrently on different streams never share one. Split launches have
# fewer than sm_count (batch, KV head) pairs (decode_splits); a call with more, or one that would need a bigger
# buffer while a CUDA graph is being captured, uses a per-call zeroed one.
MAX_COUNTERS = 4096
MIN_WORK = 1 << 16  # float32 partials held from the start (256 KB); a call that needs more grows it once
_SPLIT_BUFFERS: dict = {}
_OUTGROWN: list = []  # replaced buffers, never freed: a launch on their stream may still be using one


def _zeros_outside_graph_pools(device: torch.device, count: int) -> torch.Tensor:
    """torch.zeros made on a helper thread. While cudagraph trees warm up a compiled function, every allocation of
    the calling thread goes to the graph's private memory pool, where a buffer that outlives the call is flagged
    ("tensor in cudagraph pool not tracked") and may be overwritten; another thread's allocations are not routed."""
    made: list = []

    def make():
        try:
            with torch.cuda.device(device):
                made.append(torch.zeros(count, device=device, dtype=torch.float32))
                torch.cuda.current_stream(device).synchronize()
        except Exception as exc:  # surfaced in the caller's thread
            made.append(exc)

    thread = threading.Thread(target=make, name="flashpatch-split-buffers")
    thread.start()
    thread.join()
    if isinstance(made[0], Exception):
        raise made[0]
    return made[0]


def split_buffers(device: torch.device, count: int, partials: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(zero-between-launches counters, scratch for `partials` float32 values) for this device and stream, or None
    where they can't be had now (more counters than held, or a CUDA graph capturing before a big enough buffer)."""
    if count > MAX_COUNTERS:
        return None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = (index, _current_stream(index))
    else:  # the interpreter: one stream
        key = (device.type, 0)
    held = _SPLIT_BUFFERS.get(key)
    if held is not None and held[1].numel() >= partials:
        return held
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():  # no allocation, fill or sync mid-capture
        return None
    size = MAX_COUNTERS + max(partials, MIN_WORK, 2 * held[1].numel() if held is not None else 0)
    if device.type == "cuda":
        buffer = _zeros_outside_graph_pools(torch.device("cuda", index), size)
    else:
        buffer = torch.zeros(size, device=device, dtype=torch.float32)
    if held is not None:
        _OUTGROWN.append(held)
    held = _SPLIT_BUFFERS[key] = (buffer[:MAX_COUNTERS], buffer[MAX_COUNTERS:])
    return held


class DecodePlan:
    """A decode launch worked out once for what stays fixed while a cache grows: batch, heads, query tokens, head
    dim, dtype, q's strides, flags and tiles. `run` adds what one call's key length decides (split, grid) and binds
    its tensors, so a decode step's launch costs little host time (decode is launch-bound at short caches).

    `num_splits` None: the split count follows the key length (`decode_splits` for `sm_count` SMs); an int: that
    count (capped so that every split holds keys). The split count and grid depend only on shapes (the buffer's
    length), never on `seqused_k`'s values, so a CUDA graph can capture the launch. `split_config`: the tile of split
    launches where it differs from the config's (`decode_split_config`); the split count still follows the config's
    key block, each split's length a whole number of the split tile's.
    """

    kernel = "decode"

    MAX_LENGTHS = 4096  # key lengths remembered (a dynamic cache meets a new one every step)

    def __init__(self, q_shape, q_stride, heads_k: int, dtype: torch.dtype, *, causal: bool, scale: float,
                 has_kpm: bool, has_seqused: bool, config: TileConfig, num_splits: int | None = None,
                 sm_count: int = 0, need_lse: bool = True, merge_unroll: int = MERGE_UNROLL,
                 split_config: TileConfig | None = None, window=None, softcap: float = 0.0, has_sinks: bool = False):
        batch, heads_q, seq_q, head_dim = q_shape
        self.batch, self.heads_q, self.seq_q, self.head_dim, self.heads_k = batch, heads_q, seq_q, head_dim, heads_k
        self.dtype, self.need_lse, self.config, self.split_config = dtype, need_lse, config, split_config or config
        self.num_splits, self.sm_count = num_splits, sm_count
        self.out_shape, self.lse_shape = (batch, seq_q, heads_q, head_dim), (batch, heads_q, seq_q)
        band = kernel_window(causal, window)
        win_left, win_right = band or (0, 0)
        qk_scale, cap_log2 = (scale / softcap, softcap * LOG2E.value) if softcap else (scale * LOG2E.value, 0.0)
        self.q_scalars = (qk_scale, *q_stride)
        self.head_scalars = (heads_k, heads_q // heads_k, seq_q)
        self.feature_scalars = (float(cap_log2), win_left, win_right)
        block_d = max(16, next_power_of_2(head_dim))
        constexprs = dict(
            BLOCK_R=decode_rows(seq_q, heads_q // heads_k), BLOCK_N=config.block_n, BLOCK_D=block_d,
            CAUSAL=causal and band is None, HAS_KPM=has_kpm, HAS_SEQUSED=has_seqused, EVEN_D=block_d == head_dim,
            STORE_LSE=need_lse, DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", MERGE_UNROLL=merge_unroll,
            SOFTCAP=bool(softcap), WINDOW=band is not None, HAS_SINKS=has_sinks,
            num_warps=config.num_warps, num_stages=config.num_stages)
        split = self.split_config
        self.constexprs = {False: {**constexprs, "SPLIT": False},
                           True: {**constexprs, "SPLIT": True, "BLOCK_N": split.block_n, "num_warps": split.num_warps,
                                  "num_stages": split.num_stages}}
        self.lengths: dict = {}  # key length -> (grid, split_len, float32 partials)
        self.variants: dict = {}  # compiled kernels (CachedLauncher.launch_planned)

    def _layout(self, seq_k: int):
        pairs = self.batch * self.heads_k
        splits = self.num_splits
        if splits is None:
            splits = decode_splits(pairs, self.seq_q, seq_k, self.config.block_n, self.sm_count)
        block_n = self.split_config.block_n if splits > 1 else self.config.block_n
        split_len = cdiv(cdiv(seq_k, splits), block_n) * block_n
        splits = cdiv(seq_k, split_len)
        partials = self.batch * self.heads_q * self.seq_q * splits * (self.head_dim + 1) if splits > 1 else 0
        if len(self.lengths) >= self.MAX_LENGTHS:
            self.lengths.clear()
        layout = self.lengths[seq_k] = ((splits, pairs, 1), split_len, partials)
        return layout

    def run(self, q, k, v, key_padding_mask=None, seqused_k=None, segment_ids=None, seed: int = 0, sinks=None):
        """(out [B, Sq, Hq, D] (transformers' layout; `.transpose(1, 2)` is SDPA's), lse [B, Hq, Sq] or None).
        A plan's `run` signature; the decode kernel takes no segments or dropout. sinks: [Hq] logits, for a plan
        made with has_sinks."""
        seq_k = k.shape[2]
        layout = self.lengths.get(seq_k)
        grid, split_len, partials = layout if layout is not None else self._layout(seq_k)
        device = q.device
        out = torch.empty(self.out_shape, device=device, dtype=self.dtype)
        lse = torch.empty(self.lse_shape, device=device, dtype=torch.float32) if self.need_lse else out
        counters = work = out  # never read without splits
        if partials:
            buffers = split_buffers(device, self.batch * self.heads_k, partials)
            if buffers is None:  # counters at the tail of one zeroed allocation, made for this call alone
                work = torch.zeros(partials + self.batch * self.heads_k, device=device, dtype=torch.float32)
                counters = work[partials:]
            else:
                counters, work = buffers
        if key_padding_mask is not None:
            kpm = key_padding_mask.view(torch.uint8)
            stride_mb, stride_mn = kpm.stride()
        else:
            kpm, stride_mb, stride_mn = out, 0, 0  # never read
        seqused = seqused_k if seqused_k is not None else out  # never read without HAS_SEQUSED
        cache_strides = (*k.stride(), *v.stride(), stride_mb, stride_mn)
        _launch_decode.launch_planned(
            self.variants, grid, (q, k, v, out, lse, work, counters, kpm, seqused, out if sinks is None else sinks),
            (*self.q_scalars, *cache_strides, *self.head_scalars, seq_k, self.head_dim, split_len,
             *self.feature_scalars),
            self.constexprs[partials > 0], (*cache_strides, seq_k, split_len), tag=partials > 0)
        return out, (lse if self.need_lse else None)


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
    need_lse: bool = True,
    merge_unroll: int | None = None,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as `flash_attn_forward`, for the shapes `uses_decode_kernel` accepts; with need_lse=False
    (inference) the lse is neither written nor returned. One call's `DecodePlan`."""
    plan = DecodePlan(q.shape, q.stride(), k.shape[1], q.dtype, causal=causal, scale=scale,
                      has_kpm=key_padding_mask is not None, has_seqused=seqused_k is not None, config=config,
                      num_splits=num_splits, need_lse=need_lse, merge_unroll=merge_unroll or MERGE_UNROLL,
                      window=window, softcap=softcap, has_sinks=sinks is not None)
    out, lse = plan.run(q, k, v, key_padding_mask, seqused_k, None, 0, sinks)
    return out.transpose(1, 2), lse
