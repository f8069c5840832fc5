"""Hopper (sm90) forward in Triton's Gluon layer: a warp-specialised flash attention of the FlashAttention-3 kind.

It serves the plain forward on H100/H200 class GPUs: 16-bit q/k/v with descriptor-legal strides (the
[B, S, H, D] projections transformers hands over, viewed as [B, H, S, D]), head dim 64, 128 or 256, GQA by
index, bottom-right causal, ragged lengths, optional log-sum-exp. No masks, segments, dropout or key splits:
those stay with forward.py. Entry points: `sm90_eligible` and `flash_attn_forward_sm90`.

One program owns BLOCK_M = 64 * NUM_CONSUMERS query rows of one (batch, head) and walks that head's keys:

  * a producer warp issues TMA loads: each consumer's 64-row Q tile once per tile, then K and V blocks into a
    ring of NUM_STAGES shared-memory buffers, K and V with separate ready/empty mbarriers so S = Q K^T can
    start before V lands and a K buffer frees as soon as its S is done;
  * NUM_CONSUMERS consumer warpgroups (4 warps each, 64 query rows each) share that K/V stream. Each runs
    S = Q K^T as an async wgmma from shared memory, the online softmax in registers (exp2, running max/sum),
    and O += P V with P kept in registers as the wgmma A operand and V read from shared memory.
  * OVERLAP: a consumer issues S(j) and PV(j-1) back to back and runs softmax(j) while PV(j-1) is on the
    tensor cores (FA3's intra-warpgroup pipelining). PINGPONG (with OVERLAP): an mbarrier token passed
    round the consumers orders their wgmma issues, so one warpgroup's softmax runs while the other's
    matmuls do (FA3's inter-warpgroup schedule).
  * Register reallocation (setmaxnreg through gl.warp_specialize's worker register counts): the producer
    drops to PRODUCER_REGS, the consumers rise to about CONSUMER_REGS.
  * The tile loop is persistent-ready: with grid = number of tiles each program runs one tile; with
    grid = number of SMs (`Sm90Config.persistent`) each strides over tiles, the producer running ahead into
    the next tile's keys while the consumers finish the last one. Tiles go head-major (a head's tiles run
    together, so its K/V blocks are read from L2), query blocks of a causal head longest first.

The output tile leaves through the consumer's Q buffer (no longer read once its last S is done) by a TMA
store, which clips rows past Sq; TMA loads zero-fill rows past Sq/Sk, and key columns past Sk are masked.
"""

import inspect
import math
from dataclasses import dataclass

import torch

from .forward_tma import _descriptor_legal

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    # The kernel is written against Triton 3.6's Gluon, whose warp_specialize takes (function, args) pairs;
    # earlier releases had another signature.
    HAS_GLUON = "functions_and_args" in inspect.signature(gl.warp_specialize).parameters
except ImportError:  # a Triton without Gluon: sm90_eligible() is False and nothing here compiles

    class _NoGluon:
        constexpr = None

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    gluon = gl = _NoGluon()
    HAS_GLUON = False

if HAS_GLUON:
    # Triton 3.6 names the TMA copies async_copy_global_to_shared / async_copy_shared_to_global; later releases
    # call them async_load / async_store (and make the old names raise).
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global

LOG2E = 1.4426950408889634
CONSUMER_ROWS = 64  # query rows per consumer warpgroup: one m64 wgmma row block
NUM_CONSUMERS = 2  # consumer warpgroups per program (a third would leave each 160 registers: it spills)
SM90_HEAD_DIMS = (64, 128, 256)
SHARED_MEMORY_LIMIT = 232448  # bytes of shared memory one H100/H200 block may use (227 KB)


@dataclass(frozen=True)
class Sm90Config:
    block_n: int  # keys per step
    num_stages: int  # K (and V) buffers in the shared-memory ring
    overlap: bool = True  # softmax(j) under PV(j-1)
    pingpong: bool = False  # consumers take turns issuing their wgmmas (needs overlap)
    persistent: bool = False  # grid = number of SMs, each program strides over the tiles
    consumer_regs: int = 240  # per thread, for the consumer warpgroups that run as workers
    producer_regs: int = 24  # per thread, for the producer warp (and its warpgroup's padding)

    @property
    def block_m(self) -> int:
        return CONSUMER_ROWS * NUM_CONSUMERS

    def shared_bytes(self, head_dim: int, element_size: int = 2) -> int:
        """Q tiles + K and V rings (the barriers add a few dozen bytes)."""
        return (self.block_m + 2 * self.num_stages * self.block_n) * head_dim * element_size

    def label(self) -> str:
        flags = "".join(f for f, on in (("+ov", self.overlap), ("+pp", self.pingpong), ("+persist", self.persistent))
                        if on)
        return f"m{self.block_m}n{self.block_n}s{self.num_stages}{flags}"


# Candidates per head dim, the first is the default. Registers: 65536 per SM; the kernel starts at 168 per thread
# for its 12 warps (4 + 4 + the producer warp padded to a warpgroup), the producer's warpgroup drops to
# producer_regs and the consumers rise to 240 (the worker) and 264 - producer_regs (the default partition).
# At head dim 256 a 24-register producer spills one value, so it keeps 32.
SM90_CONFIGS: dict[int, list[Sm90Config]] = {
    64: [Sm90Config(128, 3, overlap=True, pingpong=True),
         Sm90Config(128, 3, overlap=True),
         Sm90Config(128, 3, overlap=False),
         Sm90Config(128, 3, overlap=True, pingpong=True, persistent=True)],
    128: [Sm90Config(128, 2, overlap=True, pingpong=True),
          Sm90Config(128, 2, overlap=True),
          Sm90Config(128, 2, overlap=False),
          Sm90Config(128, 2, overlap=True, pingpong=True, persistent=True)],
    256: [Sm90Config(64, 2, overlap=True, pingpong=True, producer_regs=32),
          Sm90Config(64, 2, overlap=True, producer_regs=32),
          Sm90Config(64, 2, overlap=False, producer_regs=32)],
}


def default_config(head_dim: int) -> Sm90Config:
    return SM90_CONFIGS[head_dim][0]


# ---------------------------------------------------------------------------------------------------------------
# Step 1: tiles. A tile is (batch, query head, query block); producer and consumers walk the same tile sequence.
# ---------------------------------------------------------------------------------------------------------------
@gluon.jit
def _tile_coords(tile, num_m_blocks, heads_q, CAUSAL: gl.constexpr):
    bh = tile // num_m_blocks
    m_block = tile % num_m_blocks
    if CAUSAL:  # the longest rows of a head first
        m_block = num_m_blocks - 1 - m_block
    return bh // heads_q, bh % heads_q, m_block


@gluon.jit
def _num_key_blocks(m_block, seq_q, seq_k, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """Key blocks the program's BLOCK_M rows see (0 for causal rows above every key when Sq > Sk)."""
    hi = seq_k
    if CAUSAL:  # bottom-right: query i sees keys j <= i + seq_k - seq_q
        hi = gl.maximum(gl.minimum(seq_k, (m_block + 1) * BLOCK_M + seq_k - seq_q), 0)
    return (hi + BLOCK_N - 1) // BLOCK_N


# ---------------------------------------------------------------------------------------------------------------
# Step 2: the producer warp. It waits for a buffer to be empty, arms its ready barrier with the byte count and
# issues the TMA copy; fresh barriers pass a wait on phase 1, so the first round of waits falls through.
# ---------------------------------------------------------------------------------------------------------------
@gluon.jit
def _load_q_tiles(desc_q, q_smem, q_ready, q_empty, b, h, row0, tile_count, NUM_CONSUMERS: gl.constexpr):
    ROWS: gl.constexpr = desc_q.block_type.shape[2]
    for w in gl.static_range(NUM_CONSUMERS):
        mbarrier.wait(q_empty.index(w), (tile_count & 1) ^ 1)  # consumer w has stored its last output tile
        mbarrier.expect(q_ready.index(w), desc_q.block_type.nbytes)
        _tma_load(desc_q, [b, h, row0 + w * ROWS, 0], q_ready.index(w), q_smem.index(w))


@gluon.jit
def _producer(desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
              seq_q, seq_k, heads_q, group_size, num_m_blocks, num_tiles,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
              NUM_CONSUMERS: gl.constexpr, CAUSAL: gl.constexpr):
    kv_count = 0  # K/V blocks loaded so far: ring slot and phase, continuing across tiles
    tile_count = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        b, h, m_block = _tile_coords(tile, num_m_blocks, heads_q, CAUSAL)
        kv_h = h // group_size  # GQA: consecutive query heads share a K/V head
        n_blocks = _num_key_blocks(m_block, seq_q, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
        if n_blocks == 0:
            _load_q_tiles(desc_q, q_smem, q_ready, q_empty, b, h, m_block * BLOCK_M, tile_count, NUM_CONSUMERS)
        for j in range(n_blocks):
            stage = kv_count % NUM_STAGES
            phase = (kv_count // NUM_STAGES) & 1
            mbarrier.wait(k_empty.index(stage), phase ^ 1)
            mbarrier.expect(k_ready.index(stage), desc_k.block_type.nbytes)
            _tma_load(desc_k, [b, kv_h, j * BLOCK_N, 0], k_ready.index(stage), k_smem.index(stage))
            if j == 0:  # after the first K block: in a persistent program it need not wait for the last epilogue
                _load_q_tiles(desc_q, q_smem, q_ready, q_empty, b, h, m_block * BLOCK_M, tile_count, NUM_CONSUMERS)
            mbarrier.wait(v_empty.index(stage), phase ^ 1)
            mbarrier.expect(v_ready.index(stage), desc_v.block_type.nbytes)
            _tma_load(desc_v, [b, kv_h, j * BLOCK_N, 0], v_ready.index(stage), v_smem.index(stage))
            kv_count += 1
        tile_count += 1


# ---------------------------------------------------------------------------------------------------------------
# Step 3: consumer pieces. The turn token (PINGPONG) is one mbarrier per consumer: consumer w waits on its own,
# issues, and arrives on the next one's. Consumer 0's first wait is on phase 1 of a fresh barrier, so it starts.
# ---------------------------------------------------------------------------------------------------------------
@gluon.jit
def _take_turn(turns, turn_count, WG: gl.constexpr, PINGPONG: gl.constexpr):
    if PINGPONG:
        if WG == 0:
            mbarrier.wait(turns.index(WG), (turn_count & 1) ^ 1)
        else:
            mbarrier.wait(turns.index(WG), turn_count & 1)
    return turn_count + 1


@gluon.jit
def _pass_turn(turns, WG: gl.constexpr, NUM_CONSUMERS: gl.constexpr, PINGPONG: gl.constexpr):
    if PINGPONG:
        mbarrier.arrive(turns.index((WG + 1) % NUM_CONSUMERS))


@gluon.jit
def _scores(q_mma, k_buf, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
            s_layout: gl.constexpr):
    """Issue S = Q K^T (async): Q and K from shared memory, K transposed as a view."""
    k_t = k_buf.reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
    s = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    return warpgroup_mma(q_mma, k_t, s, use_acc=False, is_async=True)


@gluon.jit
def _softmax_step(s, m_i, l_i, qk_scale, start_n, row0, seq_k, causal_offset, masked, ROWS: gl.constexpr,
                  BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, s_layout: gl.constexpr):
    """Online softmax of one block in base 2. m_i is the running max of raw scores; scaling is folded into one
    FFMA per score. Returns p (fp32), the rescale factor alpha for O and l, and the new m_i, l_i."""
    if masked:  # the diagonal block(s) and the ragged tail: keys past Sk (TMA reads zeros there) and future keys
        # One bound per row, relative to the block: key column c is visible iff c < limit.
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        if CAUSAL:
            rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
            limit = gl.minimum(rows + (row0 + causal_offset + 1 - start_n), seq_k - start_n)
            visible = gl.expand_dims(cols, 0) < gl.expand_dims(limit, 1)
        else:
            visible = gl.expand_dims(cols < seq_k - start_n, 0)
        s = gl.where(visible, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1))
    # A row that has seen no key yet keeps m = -inf: subtract 0 instead so exp2 gives 0, not NaN.
    m_scaled = gl.where(m_new == float("-inf"), 0.0, m_new * qk_scale)
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_scaled, 1))
    alpha = gl.exp2(m_i * qk_scale - m_scaled)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, alpha, m_new, l_i


@gluon.jit
def _rescale(acc, alpha, o_rows: gl.constexpr):
    return acc * gl.expand_dims(gl.convert_layout(alpha, o_rows), 1)


# ---------------------------------------------------------------------------------------------------------------
# Step 4: a consumer warpgroup's key loop over one tile, in two schedules.
# ---------------------------------------------------------------------------------------------------------------
@gluon.jit
def _key_loop_plain(q_mma, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, acc, m_i, l_i, kv_count, n_blocks,
                    n_unmasked, qk_scale, row0, seq_k, causal_offset,
                    BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                    s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr):
    """S(j), softmax(j), PV(j) in turn; the other consumer warpgroup fills the tensor cores meanwhile."""
    ROWS: gl.constexpr = q_mma.shape[0]
    for j in range(n_blocks):
        stage = (kv_count + j) % NUM_STAGES
        phase = ((kv_count + j) // NUM_STAGES) & 1
        mbarrier.wait(k_ready.index(stage), phase)
        s = _scores(q_mma, k_smem.index(stage), ROWS, BLOCK_N, HEAD_DIM, s_layout)
        s = warpgroup_mma_wait(0, deps=(s,))
        mbarrier.arrive(k_empty.index(stage))
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, qk_scale, j * BLOCK_N, row0, seq_k, causal_offset,
                                           j >= n_unmasked, ROWS, BLOCK_N, CAUSAL, s_layout)
        acc = _rescale(acc, alpha, gl.SliceLayout(1, o_layout))
        p_op = gl.convert_layout(p.to(k_smem.dtype), p_layout)
        mbarrier.wait(v_ready.index(stage), phase)
        v = v_smem.index(stage).reshape([BLOCK_N, HEAD_DIM])
        acc = warpgroup_mma(p_op, v, acc, is_async=True)
        acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
        mbarrier.arrive(v_empty.index(stage))
    return acc, m_i, l_i


@gluon.jit
def _key_loop_overlapped(q_mma, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turns, acc, m_i, l_i, kv_count,
                         turn_count, n_blocks, n_unmasked, qk_scale, row0, seq_k, causal_offset,
                         WG: gl.constexpr, NUM_CONSUMERS: gl.constexpr, BLOCK_N: gl.constexpr,
                         HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                         PINGPONG: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr,
                         p_layout: gl.constexpr):
    """Needs n_blocks >= 1. Iteration j issues S(j) and PV(j-1) together, waits for S(j) only, runs softmax(j)
    while PV(j-1) runs, then waits for PV(j-1) and rescales O. P(j) is carried into the next iteration."""
    ROWS: gl.constexpr = q_mma.shape[0]
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    stage = kv_count % NUM_STAGES
    phase = (kv_count // NUM_STAGES) & 1
    mbarrier.wait(k_ready.index(stage), phase)
    turn_count = _take_turn(turns, turn_count, WG, PINGPONG)
    s = _scores(q_mma, k_smem.index(stage), ROWS, BLOCK_N, HEAD_DIM, s_layout)
    _pass_turn(turns, WG, NUM_CONSUMERS, PINGPONG)
    s = warpgroup_mma_wait(0, deps=(s,))
    mbarrier.arrive(k_empty.index(stage))
    p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, qk_scale, 0, row0, seq_k, causal_offset, 0 >= n_unmasked,
                                       ROWS, BLOCK_N, CAUSAL, s_layout)
    p_op = gl.convert_layout(p.to(k_smem.dtype), p_layout)
    for j in range(1, n_blocks):
        prev_stage = (kv_count + j - 1) % NUM_STAGES
        prev_phase = ((kv_count + j - 1) // NUM_STAGES) & 1
        stage = (kv_count + j) % NUM_STAGES
        phase = ((kv_count + j) // NUM_STAGES) & 1
        mbarrier.wait(k_ready.index(stage), phase)
        mbarrier.wait(v_ready.index(prev_stage), prev_phase)
        turn_count = _take_turn(turns, turn_count, WG, PINGPONG)
        s = _scores(q_mma, k_smem.index(stage), ROWS, BLOCK_N, HEAD_DIM, s_layout)
        v = v_smem.index(prev_stage).reshape([BLOCK_N, HEAD_DIM])
        acc = warpgroup_mma(p_op, v, acc, is_async=True)
        _pass_turn(turns, WG, NUM_CONSUMERS, PINGPONG)
        s = warpgroup_mma_wait(1, deps=(s,))  # S(j) done; PV(j-1) may still run
        mbarrier.arrive(k_empty.index(stage))
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, qk_scale, j * BLOCK_N, row0, seq_k, causal_offset,
                                           j >= n_unmasked, ROWS, BLOCK_N, CAUSAL, s_layout)
        p_next = gl.convert_layout(p.to(k_smem.dtype), p_layout)  # 16-bit now: fewer live registers
        acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
        mbarrier.arrive(v_empty.index(prev_stage))
        acc = _rescale(acc, alpha, o_rows)
        p_op = p_next
    last = (kv_count + n_blocks - 1) % NUM_STAGES
    last_phase = ((kv_count + n_blocks - 1) // NUM_STAGES) & 1
    mbarrier.wait(v_ready.index(last), last_phase)
    turn_count = _take_turn(turns, turn_count, WG, PINGPONG)
    acc = warpgroup_mma(p_op, v_smem.index(last).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
    _pass_turn(turns, WG, NUM_CONSUMERS, PINGPONG)
    acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
    mbarrier.arrive(v_empty.index(last))
    return acc, m_i, l_i, turn_count


# ---------------------------------------------------------------------------------------------------------------
# Step 5: a consumer warpgroup: its 64 rows of every tile, the epilogue through its Q buffer, and the lse.
# ---------------------------------------------------------------------------------------------------------------
@gluon.jit
def _consumer(desc_o, lse_ptr, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turns,
              qk_scale, seq_q, seq_k, heads_q, num_m_blocks, num_tiles,
              WG: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
              NUM_STAGES: gl.constexpr, NUM_CONSUMERS: gl.constexpr, CAUSAL: gl.constexpr, OVERLAP: gl.constexpr,
              PINGPONG: gl.constexpr, WRITE_LSE: gl.constexpr):
    ROWS: gl.constexpr = BLOCK_M // NUM_CONSUMERS
    # wgmma accumulators: 4 warps stacked along M (16 rows each), instruction N = the tile's N.
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)

    q_tile = q_smem.index(WG)  # [1, 1, ROWS, HEAD_DIM]: the TMA view
    q_mma = q_tile.reshape([ROWS, HEAD_DIM])
    causal_offset = seq_k - seq_q
    kv_count = 0
    tile_count = 0
    turn_count = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        b, h, m_block = _tile_coords(tile, num_m_blocks, heads_q, CAUSAL)
        row0 = m_block * BLOCK_M + WG * ROWS
        n_blocks = _num_key_blocks(m_block, seq_q, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
        # Blocks before n_unmasked see only keys < Sk that every one of this warpgroup's rows may attend.
        mask_from = seq_k
        if CAUSAL:
            mask_from = gl.minimum(seq_k, row0 + causal_offset + 1)
        n_unmasked = gl.maximum(mask_from, 0) // BLOCK_N

        m_i = gl.full([ROWS], float("-inf"), gl.float32, s_rows)
        l_i = gl.zeros([ROWS], gl.float32, s_rows)
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
        mbarrier.wait(q_ready.index(WG), tile_count & 1)
        if OVERLAP:
            if n_blocks > 0:
                acc, m_i, l_i, turn_count = _key_loop_overlapped(
                    q_mma, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turns, acc, m_i, l_i, kv_count,
                    turn_count, n_blocks, n_unmasked, qk_scale, row0, seq_k, causal_offset, WG, NUM_CONSUMERS,
                    BLOCK_N, HEAD_DIM, NUM_STAGES, CAUSAL, PINGPONG, s_layout, o_layout, p_layout)
        else:
            acc, m_i, l_i = _key_loop_plain(q_mma, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, acc, m_i,
                                            l_i, kv_count, n_blocks, n_unmasked, qk_scale, row0, seq_k,
                                            causal_offset, BLOCK_N, HEAD_DIM, NUM_STAGES, CAUSAL, s_layout,
                                            o_layout, p_layout)
        kv_count += n_blocks

        # Epilogue. A row that saw no key (l = 0) returns zeros and lse = -inf.
        seen = l_i > 0.0
        inv_l = gl.where(seen, 1.0 / gl.where(seen, l_i, 1.0), 0.0)
        out = acc * gl.expand_dims(gl.convert_layout(inv_l, o_rows), 1)
        q_mma.store(out.to(desc_o.dtype))
        fence_async_shared()
        _tma_store(desc_o, [b, h, row0, 0], q_tile)  # rows past Sq are clipped
        if WRITE_LSE:
            rows = row0 + gl.arange(0, ROWS, layout=s_rows)
            m_scaled = gl.where(seen, m_i * qk_scale, 0.0)
            lse = gl.where(seen, (m_scaled + gl.log2(gl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
            gl.store(lse_ptr + (b * heads_q + h) * seq_q + rows, lse, mask=rows < seq_q)
        tma.store_wait(0)
        mbarrier.arrive(q_empty.index(WG))  # the Q buffer may take the next tile's rows
        tile_count += 1


# ---------------------------------------------------------------------------------------------------------------
# Step 6: the kernel: shared memory, barriers, and the partitions.
# ---------------------------------------------------------------------------------------------------------------
# Lengths and head counts are not specialised on (== 1, multiple of 16): one compile per config and dtype.
@gluon.jit(do_not_specialize=["seq_q", "seq_k", "heads_q", "group_size", "num_m_blocks", "num_tiles"])
def _attn_fwd_sm90(desc_q, desc_k, desc_v, desc_o, lse_ptr, qk_scale, seq_q, seq_k, heads_q, group_size,
                   num_m_blocks, num_tiles,
                   BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr,
                   NUM_CONSUMERS: gl.constexpr, CAUSAL: gl.constexpr, OVERLAP: gl.constexpr,
                   PINGPONG: gl.constexpr, WRITE_LSE: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                   PRODUCER_REGS: gl.constexpr):
    dtype: gl.constexpr = desc_q.dtype
    ROWS: gl.constexpr = desc_q.block_type.shape[2]
    BLOCK_M: gl.constexpr = ROWS * NUM_CONSUMERS
    q_smem = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS, 1, 1, ROWS, HEAD_DIM], desc_q.layout)
    k_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, 1, 1, BLOCK_N, HEAD_DIM], desc_k.layout)
    v_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, 1, 1, BLOCK_N, HEAD_DIM], desc_v.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for w in gl.static_range(NUM_CONSUMERS):
        mbarrier.init(q_ready.index(w), count=1)
        mbarrier.init(q_empty.index(w), count=1)
        mbarrier.init(turns.index(w), count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=NUM_CONSUMERS)  # one arrive per consumer warpgroup
        mbarrier.init(v_empty.index(i), count=NUM_CONSUMERS)
    fence_async_shared()

    # The default partition (this kernel's 4 warps) is consumer 0; the other consumers and the producer are workers.
    gl.static_assert(NUM_CONSUMERS == 2)
    gl.warp_specialize([
        (_consumer, (desc_o, lse_ptr, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
                     turns, qk_scale, seq_q, seq_k, heads_q, num_m_blocks, num_tiles, 0, BLOCK_M, BLOCK_N,
                     HEAD_DIM, NUM_STAGES, NUM_CONSUMERS, CAUSAL, OVERLAP, PINGPONG, WRITE_LSE)),
        (_consumer, (desc_o, lse_ptr, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
                     turns, qk_scale, seq_q, seq_k, heads_q, num_m_blocks, num_tiles, 1, BLOCK_M, BLOCK_N,
                     HEAD_DIM, NUM_STAGES, NUM_CONSUMERS, CAUSAL, OVERLAP, PINGPONG, WRITE_LSE)),
        (_producer, (desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready,
                     v_empty, seq_q, seq_k, heads_q, group_size, num_m_blocks, num_tiles, BLOCK_M, BLOCK_N,
                     NUM_STAGES, NUM_CONSUMERS, CAUSAL)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


# ---------------------------------------------------------------------------------------------------------------
# Step 7: the host side.
# ---------------------------------------------------------------------------------------------------------------
def _gl_dtype(dtype: torch.dtype):
    return {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}[dtype]


def _descriptor(t: torch.Tensor, rows: int):
    """Over the [B, H, S, D] view as it is strided: no copy for a [B, S, H, D] projection either."""
    block = [1, 1, rows, t.shape[-1]]
    layout = gl.NVMMASharedLayout.get_default_for(block, _gl_dtype(t.dtype))
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)


def _constexprs(config: Sm90Config, head_dim: int, causal: bool, need_lse: bool) -> dict:
    if config.pingpong and not config.overlap:
        raise ValueError("pingpong needs overlap")
    return dict(BLOCK_N=config.block_n, HEAD_DIM=head_dim, NUM_STAGES=config.num_stages,
                NUM_CONSUMERS=NUM_CONSUMERS, CAUSAL=causal, OVERLAP=config.overlap,
                PINGPONG=config.pingpong, WRITE_LSE=need_lse, CONSUMER_REGS=config.consumer_regs,
                PRODUCER_REGS=config.producer_regs)


_SM_COUNT: dict = {}
# (config, head_dim, causal, dtype, need_lse) -> the compiled kernel of the last launch, for inspection
# (registers, spills, shared memory).
COMPILED: dict = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def sm90_eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Gluon present, a Hopper GPU (wgmma is sm90-only), 16-bit inputs, head dim 64/128/256, descriptor-legal
    strides (TMA: unit inner stride, 16-byte aligned base and strides), Hq a multiple of Hkv."""
    return (HAS_GLUON and q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9
            and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype and v.dtype == q.dtype
            and q.dim() == 4 and k.shape == v.shape and q.shape[0] == k.shape[0] and q.shape[-1] == k.shape[-1]
            and q.shape[-1] in SM90_HEAD_DIMS and k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0
            and all(_descriptor_legal(t) for t in (q, k, v)))


def flash_attn_forward_sm90(q, k, v, *, causal: bool, scale: float, need_lse: bool = True,
                            config: Sm90Config | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q: [B, Hq, Sq, D], k/v: [B, Hkv, Sk, D]. Returns out [B, Hq, Sq, D] (memory [B, Sq, Hq, D], q's dtype)
    and lse float32 [B, Hq, Sq] (natural log of the scaled scores' sum-exp; -inf for rows that see no key),
    or None for lse with need_lse=False."""
    batch, heads_q, seq_q, head_dim = q.shape
    heads_k, seq_k = k.shape[1], k.shape[2]
    config = config or default_config(head_dim)
    out = torch.empty((batch, seq_q, heads_q, head_dim), device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty((batch, heads_q, seq_q), device=q.device, dtype=torch.float32) if need_lse else None
    if out.numel() == 0:
        return out, lse
    if seq_k == 0:  # no key at all: every row is empty
        out.zero_()
        if lse is not None:
            lse.fill_(float("-inf"))
        return out, lse
    num_m_blocks = math.ceil(seq_q / config.block_m)
    num_tiles = num_m_blocks * batch * heads_q
    grid = min(num_tiles, _sm_count(q.device)) if config.persistent else num_tiles
    lse_arg = lse if lse is not None else torch.empty(1, device=q.device, dtype=torch.float32)
    compiled = _attn_fwd_sm90[(grid, )](
        _descriptor(q, CONSUMER_ROWS), _descriptor(k, config.block_n), _descriptor(v, config.block_n),
        _descriptor(out, CONSUMER_ROWS), lse_arg, scale * LOG2E, seq_q, seq_k, heads_q, heads_q // heads_k,
        num_m_blocks, num_tiles, **_constexprs(config, head_dim, causal, need_lse), num_warps=4)
    COMPILED[(config, head_dim, causal, q.dtype, need_lse)] = compiled
    return out, lse


# ---------------------------------------------------------------------------------------------------------------
# Compiling without a GPU, for tests and inspection (Triton's bundled ptxas).
# ---------------------------------------------------------------------------------------------------------------
def compile_sm90(config: Sm90Config, head_dim: int, *, causal: bool, dtype: torch.dtype = torch.bfloat16,
                 need_lse: bool = True):
    """The kernel compiled for an sm90 target as a launch with `config` would compile it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    def desc_type(rows):
        return mangle_type(_descriptor(torch.empty(1, 1, rows, head_dim, dtype=dtype), rows))

    kernel = _attn_fwd_sm90
    constexprs = _constexprs(config, head_dim, causal, need_lse)
    runtime = dict(desc_q=desc_type(CONSUMER_ROWS), desc_k=desc_type(config.block_n),
                   desc_v=desc_type(config.block_n), desc_o=desc_type(CONSUMER_ROWS), lse_ptr="*fp32",
                   qk_scale="fp32")
    names = kernel.arg_names
    signature = {n: "constexpr" if n in constexprs else runtime.get(n, "i32") for n in names}
    source = GluonASTSource(kernel, signature, constexprs={(names.index(n),): v for n, v in constexprs.items()},
                            attrs={(names.index("lse_ptr"),): [["tt.divisibility", 16]]})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))


def resource_usage(compiled) -> dict:
    """Registers per thread and stack bytes (spills land there) of a compiled kernel, read from its cubin with
    the cuobjdump Triton bundles; an empty dict where that tool is missing."""
    import os
    import re
    import subprocess
    import tempfile

    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return {"registers": int(found.group(1)), "stack": int(found.group(2))} if found else {}


def ptx_census(ptx: str) -> dict:
    """What the PTX holds that the design relies on."""
    import re
    return {"wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
            "tma_loads": len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.shared::(?:cluster|cta)\.global", ptx)),
            "tma_stores": len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.global\.shared", ptx)),
            "setmaxnreg": sorted(set(re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx))),
            "ld_shared": len(re.findall(r"ld\.shared", ptx)), "st_shared": len(re.findall(r"st\.shared", ptx))}
