"""Hopper (sm90) backward in Triton's Gluon layer: dQ, dK, dV of the FlashAttention-3 kind.

It serves the plain backward on H100/H200 class GPUs: 16-bit q/k/v/out/grad_out with descriptor-legal strides
(the [B, S, H, D] projections transformers hands over, viewed as [B, H, S, D]), head dim 64, 80, 96 or 128 (80 and
96 run the 128-wide kernel: TMA zero-fills the missing columns on load and clips them on store), GQA, bottom-right
causal, ragged lengths and (warp-specialised configs) a key padding mask and packed segment ids. No dropout,
windows, softcapping or sinks, and no head dim 256 (two [64, 256] float32 accumulators are all of a warpgroup's
registers): those stay with backward.py. Entry points:
`sm90_backward_eligible` and `flash_attn_backward_sm90`; kernels/plans.py's `backward` routes Hopper training
calls here (FLASHPATCH_SM90_BACKWARD=0 keeps them on backward.py). GPU checks: tests/test_backward_sm90.py and
scripts/sm90_backward_probe.py; compiling for sm90 without a GPU: the probe's --compile-only.

Three launches:

  * prep (plain Triton): per query row delta = rowsum(dO * O) and lse in base 2, both into buffers padded to whole
    query blocks: padding rows and rows that saw no key (lse = -inf) get lse = +inf, so P = exp2(s - lse) = 0
    there and every gradient they touch is zero. It also zeroes dQaccum, the float32 dQ accumulator.
  * the main kernel: one program per (batch, K/V head, key block of BLOCK_N = 64 * NUM_CONSUMERS keys), head-major
    (a head's key blocks run together and share its Q and dO through L2). It holds the block's K and V in shared
    memory and its dK, dV accumulators in registers, and walks the query blocks (BLOCK_M rows) of every query head
    of the K/V head's GQA group in turn: the group's dK/dV sums never leave registers (no float32 dK/dV buffer, no
    reduction launch; a program's work grows with the group). Causal programs skip the query blocks above their
    keys, and only blocks that straddle the diagonal (or, non-causal, a key block past Sk) run the masked loop;
    with a key padding mask, every block of a consumer whose 64 keys hold padding does (P = 0 for padding keys);
    with segment ids, the producer and the consumers visit only the query blocks of the key block's own packed
    sequences (`segment_planes`' run bounds), every one of them masked by segment. Persistent configs launch one
    program per SM instead, each walking those tiles in turn (rounds of one tile a program, every other round in
    reverse; causal tiles in L2 sections, key blocks longest first) or, dynamic, taking the next tile of that order
    from an atomic counter (the forward's scheduler; the producer names each tile in shared memory under the K/V
    barrier, a past-the-end index stops the consumers): the Q/dO ring and the dS^T exchange count their
    slots on across tiles, and K/V reload once both consumers have arrived on a kv_empty barrier after their last
    step, so one tile's dK/dV stores overlap the next tile's loads.
  * convert (plain Triton): dq = dQaccum * scale in q's dtype and layout.

The main kernel is warp-specialised (gl.warp_specialize):

  * a producer warp loads K and V once, then, per query block, Q with its lse and dO with its delta into a ring of
    NUM_STAGES slots: a ready barrier per tensor pair carries the TMA bytes, one empty barrier per slot takes an
    arrive from each consumer. Fresh barriers pass a wait on phase 1, so the first round falls through.
  * NUM_CONSUMERS (1 or 2) consumer warpgroups, each owning 64 of the block's keys. Scores are computed
    transposed, S^T = K Q^T ([keys, queries]), so P^T comes out of its accumulator in the orientation
    dV += P^T dO takes as a register A operand; no register tile is ever transposed. Per query block a consumer
    issues S^T and dP^T = V dO^T together (async wgmma), forms P^T = exp2(S^T * scale * log2(e) - lse)
    (causal/ragged blocks masked) and dS^T = P^T * (dP^T - delta), issues dV += P^T dO, stores dS^T to shared
    memory and issues dK += dS^T Q from there (an operand that holds no registers), then its dQ share.
  * dQ, one of two schemes. "block": the consumers exchange dS^T through shared memory (two tiles of the whole key
    block in a ring, full/free mbarriers counting both consumers) and each computes half of the block's
    dQ = dS K over all its keys: 64 columns of the head dim (BLOCK_M 64, d128) or 64 query rows (BLOCK_M 128).
    "wg": each consumer computes its own keys' share over the whole block, twice the dQ traffic, no exchange.
    The share reaches dQaccum through a shared-memory tile and a TMA reduce-add (cp.reduce.async.bulk: the adds
    happen in L2; the tile is rewritten one query block later, after a wait for that read) or with vectorised
    atomics from registers ("atomic").
  * Register reallocation: the producer drops to PRODUCER_REGS, the consumers rise to CONSUMER_REGS (consumer 0
    is the default partition, consumer 1 and the producer are workers).

A variant without warp specialisation (warp_specialize=False, Step 7) runs the same steps in one 8-warp partition
that owns the 128-key block as one tile and issues its own TMA loads NUM_STAGES - 1 query blocks ahead.

dK (scaled by the softmax scale) and dV are stored straight from the accumulators, rows past Sk and columns past
the head dim left out. dQ rows that no key reaches (causal with Sq > Sk) stay zero.
"""

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .forward_tma import _descriptor_legal
from .gluon_hopper import (HAS_GLUON, SHARED_MEMORY_LIMIT, TensorDescriptor, fence_async_shared, gl, gluon,
                           mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
from .gluon_hopper import descriptor as _descriptor
from .gluon_hopper import sm_count
from .gluon_hopper import tma_load as _tma_load
from .launch import CachedLauncher, cdiv
from .forward import segment_planes
from .forward_sm90 import L2_KV_BYTES, _get_tile, _next_tile, _put_tile, _tile_counter, section_order
from .online_softmax import LOG2E

if HAS_GLUON:
    if hasattr(tma, "async_atomic_add"):
        _tma_reduce_add = tma.async_atomic_add
    else:  # Triton 3.6 builds the TMA reduction (the op tl's descriptor atomic_add lowers to) but does not name it
        from triton._C.libtriton import ir as _ir
        from triton.experimental.gluon.language._core import builtin as _builtin

        @_builtin
        def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
            coord = _semantic._convert_to_ir_values(coord, require_i64=False)
            _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord,
                                                      src.handle)

KEY_ROWS = 64  # keys per consumer warpgroup: one m64 wgmma row block of S^T
_KEY_ROWS = tl.constexpr(KEY_ROWS)
SM90_BWD_HEAD_DIMS = (64, 80, 96, 128)
KERNEL_HEAD_DIM = {64: 64, 80: 128, 96: 128, 128: 128}
DQ_SCHEMES = ("block", "wg")
DQ_WRITES = ("tma", "atomic")


@dataclass(frozen=True)
class Sm90BwdConfig:
    block_m: int  # query rows per step (the N of S^T, the K of dV += P^T dO and dK += dS^T Q)
    num_stages: int  # Q/dO (and lse/delta) buffers in the ring
    num_consumers: int = 2  # consumer warpgroups; keys per program = 64 * num_consumers
    dq: str = "block"  # which dQ share a consumer adds to dQaccum: see DQ_SCHEMES and the module docstring
    dq_write: str = "tma"  # how it gets there: see DQ_WRITES and the module docstring
    consumer_regs: int = 240  # per thread, for the consumer warpgroups
    producer_regs: int = 24  # per thread, for the producer warp (and its warpgroup's padding)
    warp_specialize: bool = True  # False: one 8-warp partition loads its own blocks (Step 7; 128 keys, dQ "block")
    persistent: bool = False  # grid = number of SMs, each program walks key blocks in turn (warp-specialised only)
    fresh_kv: bool = False  # K/V wgmma descriptors derived in the key loop, not hoisted and spilled (see FRESH_KV)
    early_dq_wait: bool = False  # TMA dQ: wait for the last reduction during the dK/dQ wgmmas (see EARLY_DQ_WAIT)
    dynamic: bool = False  # persistent tiles handed out in order by an atomic counter (needs persistent)

    @property
    def block_n(self) -> int:
        return KEY_ROWS * self.num_consumers

    def dq_split(self) -> int:
        """0: "wg"; "block" with BLOCK_M 64: 1, the consumers split the head dim; with BLOCK_M 128: 2, the rows."""
        return 0 if self.dq == "wg" else (1 if self.block_m == 64 else 2)

    def dq_share(self, head_dim: int) -> tuple[int, int]:
        """[rows, columns] of the dQ share a consumer (without warp specialisation: the program) adds at once."""
        width = KERNEL_HEAD_DIM.get(head_dim, head_dim)
        if not self.warp_specialize:
            return self.block_m, width
        return [(self.block_m, width), (self.block_m, width // 2), (self.block_m // 2, width)][self.dq_split()]

    def shared_bytes(self, head_dim: int, element_size: int = 2) -> int:
        """K and V tiles, the Q/dO ring, dS^T tiles and (TMA dQ) float32 dQ tiles; lse/delta and barriers add a
        few hundred bytes."""
        width = KERNEL_HEAD_DIM.get(head_dim, head_dim)
        tiles = (2 * self.block_n + 2 * self.num_stages * self.block_m) * width * element_size
        ds_tiles = 2 if self.dq == "block" and self.warp_specialize else 1
        tiles += ds_tiles * self.block_n * self.block_m * element_size
        if self.dq_write == "tma":
            rows, cols = self.dq_share(head_dim)
            tiles += (self.num_consumers if self.warp_specialize else 1) * rows * cols * 4
        return tiles + 2 * self.num_stages * self.block_m * 4

    def label(self) -> str:
        return (f"m{self.block_m}n{self.block_n}s{self.num_stages}+dq_{self.dq}_{self.dq_write}"
                + ("" if self.warp_specialize else "+nows") + ("+persist" if self.persistent else "")
                + ("+dyn" if self.dynamic else "")
                + ("+fresh_kv" if self.fresh_kv else "") + ("+early_dq_wait" if self.early_dq_wait else ""))


# Candidates per kernel head dim, the first is the default. Registers: 65536 per SM; with two consumers the kernel
# starts at 168 per thread for its 12 warps, the producer's warpgroup drops to 24 and the consumers rise to 240.
# A consumer holds dK and dV ([64, head dim] float32 each: 128 registers at d128, 64 at d64), S^T and dP^T
# ([64, BLOCK_M] float32: 32 each at BLOCK_M 64, 64 at 128) and then its dQ share. So d128 takes BLOCK_M 64 (at
# 128 it spills) and d64 affords 128. The "block" dQ adds half the dQ traffic of "wg" for the same work (at full
# speed "wg" would reduce-add about 6 TB/s into L2) and splits the dQ block by 64-column halves of the head dim at
# BLOCK_M 64 (d128 only: a half is one 128-byte swizzle row of K) or by 64-row halves at BLOCK_M 128. The one-
# consumer rows (64 keys per program, 255 registers, one warpgroup issuing wgmma per SM) and the rows without warp
# specialisation (Step 7: 255 registers, loads issued in line, both warpgroups in lockstep) are there to be timed.
# Shared memory: d128 m64 s3 "block" takes 231472 of 232448 bytes; d64 m128 s3 "block" does not fit. The
# persistent rows are the defaults walking several key blocks a program (at short N each non-persistent program's
# K/V load and dK/dV store are exposed: one 198 KB program fits an SM); their key loops compile to the same spill
# and instruction counts as the defaults', and on an H200 they ran level without a mask, 12-20 % slower causal
# (BENCHMARKS §2): their static rounds load causal programs unevenly (scripts/persistent_schedule_balance.py:
# the busiest program gets 1.19x-1.23x the mean work at d128 from 2K, a greedy hand-out in the same order
# 1.00x-1.01x), which the dynamic rows (persist+dyn, with fresh_kv) address. The fresh_kv rows are the defaults with
# the K/V descriptors derived in the key loop (FRESH_KV in Step 4): compiled for sm90, d128's loops reload 0-6 values
# a step from local memory instead of 12-20. The early_dq_wait rows add EARLY_DQ_WAIT (Step 4e): five warpgroup
# barriers a step instead of six.
SM90_BWD_CONFIGS: dict[int, list[Sm90BwdConfig]] = {
    64: [Sm90BwdConfig(128, 2),
         Sm90BwdConfig(64, 2, dq="wg"),
         Sm90BwdConfig(128, 2, dq_write="atomic"),
         Sm90BwdConfig(64, 3, dq="wg"),
         Sm90BwdConfig(64, 2, num_consumers=1, dq="wg"),
         Sm90BwdConfig(128, 2, warp_specialize=False),
         Sm90BwdConfig(128, 2, persistent=True),
         Sm90BwdConfig(128, 2, fresh_kv=True),
         Sm90BwdConfig(128, 2, fresh_kv=True, early_dq_wait=True),
         Sm90BwdConfig(128, 2, persistent=True, dynamic=True, fresh_kv=True)],
    128: [Sm90BwdConfig(64, 2),
          Sm90BwdConfig(64, 3),
          Sm90BwdConfig(64, 2, dq="wg"),
          Sm90BwdConfig(64, 2, dq_write="atomic"),
          Sm90BwdConfig(64, 2, num_consumers=1, dq="wg"),
          Sm90BwdConfig(64, 2, warp_specialize=False),
          Sm90BwdConfig(64, 2, persistent=True),
          Sm90BwdConfig(64, 2, fresh_kv=True),
          Sm90BwdConfig(64, 2, fresh_kv=True, early_dq_wait=True),
          Sm90BwdConfig(64, 2, persistent=True, dynamic=True, fresh_kv=True)],
}
SM90_BWD_CONFIGS[80] = SM90_BWD_CONFIGS[96] = SM90_BWD_CONFIGS[128]


def default_config(head_dim: int) -> Sm90BwdConfig:
    return SM90_BWD_CONFIGS[head_dim][0]


# ---------------------------------------------------------------------------------------------------------------
# Step 1: prep and convert (plain Triton).
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_prep_kernel(O, DO, LSE, DELTA, LSE2, DQ_ACC, stride_ob, stride_oh, stride_om, stride_dob, stride_doh,
                     stride_dom, num_heads, seq_q, padded_q, head_dim,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DQ_WIDTH: tl.constexpr):
    """Rows [m0, m0 + BLOCK_M) of one (batch, head), padded_q of them: delta, lse * log2(e) (+inf where the row is
    padding or saw no key) and zeros for dQaccum."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < seq_q) & (cols[None, :] < head_dim)
    o = tl.load(O + b.to(tl.int64) * stride_ob + h * stride_oh + rows[:, None] * stride_om + cols[None, :],
                mask=mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h * stride_doh + rows[:, None] * stride_dom + cols[None, :],
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * seq_q + rows, mask=rows < seq_q, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    base = pid_bh.to(tl.int64) * padded_q
    tl.store(DELTA + base + rows, delta)
    tl.store(LSE2 + base + rows, lse2)
    dq_cols = tl.arange(0, DQ_WIDTH)
    tl.store(DQ_ACC + (base + rows[:, None]) * DQ_WIDTH + dq_cols[None, :],
             tl.zeros([BLOCK_M, DQ_WIDTH], dtype=tl.float32))


@triton.jit
def _bwd_dq_convert_kernel(DQ_ACC, DQ, stride_dqb, stride_dqh, stride_dqm, num_heads, seq_q, padded_q, head_dim,
                           scale, BLOCK_M: tl.constexpr, DQ_WIDTH: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, DQ_WIDTH)
    mask = (rows[:, None] < seq_q) & (cols[None, :] < head_dim)
    acc = tl.load(DQ_ACC + (pid_bh.to(tl.int64) * padded_q + rows[:, None]) * DQ_WIDTH + cols[None, :], mask=mask)
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqm + cols[None, :],
             (acc * scale).to(DQ.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Step 2: which query blocks a key block meets. Bottom-right causal: query i sees key j iff j <= i + Sk - Sq.
# ---------------------------------------------------------------------------------------------------------------
@gluon.jit
def _program_coords(heads_k, num_n_blocks):
    """(batch, K/V head, key block) of this program's tile (without persistence: one tile a program)."""
    return _tile_coords(gl.program_id(0), heads_k, num_n_blocks, 0, 0, False)


@gluon.jit
def _tile_coords(tile, heads_k, num_n_blocks, batch_kv, l2_pairs, SECTIONS: gl.constexpr):
    """(batch, K/V head, key block): head-major, so a head's key blocks run together and share its Q/dO in L2; with
    SECTIONS (persistent causal), l2_pairs (batch, K/V head) pairs at a time, their key blocks longest first across
    them (key block 0 meets every query block)."""
    if SECTIONS:
        bh, n_block = section_order(tile, num_n_blocks, l2_pairs, batch_kv)
    else:
        bh = tile // num_n_blocks
        n_block = tile % num_n_blocks
    return bh // heads_k, bh % heads_k, n_block


@gluon.jit
def _walked_tile(k):
    """A persistent program's k-th tile: rounds of one tile per program, every other round in reverse, so that
    with tiles longest first no program takes the longest of every round."""
    grid = gl.num_programs(0)
    pid = gl.program_id(0)
    return k * grid + gl.where(k % 2 == 0, pid, grid - 1 - pid)


@gluon.jit
def _query_blocks(n0, seq_q, seq_k, BLOCK_M: gl.constexpr, CAUSAL: gl.constexpr):
    """[m_lo, m_hi): the query blocks that see some key of a block starting at key n0."""
    m_lo = 0
    if CAUSAL:
        m_lo = gl.maximum(n0 - (seq_k - seq_q), 0) // BLOCK_M
    return m_lo, (seq_q + BLOCK_M - 1) // BLOCK_M


@gluon.jit
def _segment_query_blocks(m_lo, m_hi, seg_ptr, stride_sp, n0, seq_k, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr):
    """[m_lo, m_hi) narrowed to the query blocks that hold rows of the key block's own packed sequences: the run
    bounds of `segment_planes` (planes 1 and 2 of seg_ptr) at its first and last key."""
    lo = gl.load(seg_ptr + stride_sp + n0)
    hi = gl.load(seg_ptr + 2 * stride_sp + gl.minimum(n0 + BLOCK_N, seq_k) - 1)
    return gl.maximum(m_lo, lo // BLOCK_M), gl.minimum(m_hi, (hi + BLOCK_M - 1) // BLOCK_M)


@gluon.jit
def _masked_blocks(n0w, m_lo, m_hi, seq_q, seq_k, BLOCK_M: gl.constexpr, CAUSAL: gl.constexpr):
    """How many of the query blocks [m_lo, m_hi) need a mask for the 64 keys from n0w: causal, those that do not
    see every one of them (they come first); otherwise all of them when some of the keys lie past Sk, else none."""
    if CAUSAL:
        # Rows from m0 on see all keys up to n0w + 63 iff m0 >= n0w + 63 - (Sk - Sq).
        first_full = (gl.maximum(n0w + _KEY_ROWS - 1 - (seq_k - seq_q), 0) + BLOCK_M - 1) // BLOCK_M
        n = gl.minimum(gl.maximum(first_full, m_lo), m_hi) - m_lo
    else:
        n = gl.where(n0w + _KEY_ROWS > seq_k, m_hi - m_lo, 0)
    return n


# ---------------------------------------------------------------------------------------------------------------
# Step 3: the producer warp.
# ---------------------------------------------------------------------------------------------------------------
@gluon.jit
def _bwd_producer(desc_q, desc_do, desc_k, desc_v, desc_lse, desc_delta, q_smem, do_smem, k_smem, v_smem, lse_smem,
                  delta_smem, kv_ready, kv_empty, q_ready, do_ready, qdo_empty, seq_q, seq_k, heads_q, heads_k,
                  group_size, padded_q, num_n_blocks, num_tiles, batch_kv, l2_pairs, seg_ptr, stride_sb, stride_sp,
                  tile_slot, counter_ptr,
                  BLOCK_M: gl.constexpr, NUM_STAGES: gl.constexpr, NUM_CONSUMERS: gl.constexpr,
                  CAUSAL: gl.constexpr, HAS_SEG: gl.constexpr, PERSISTENT: gl.constexpr, DYNAMIC: gl.constexpr):
    if DYNAMIC:  # tiles in order, each to the program that asks first: its index in tile_slot, under kv_ready
        it = 0
        t_local = 0
        tile = gl.program_id(0)
        while tile < num_tiles:
            b, kv_h, n_block = _tile_coords(tile, heads_k, num_n_blocks, batch_kv, l2_pairs, CAUSAL)
            mbarrier.wait(kv_empty, (t_local & 1) ^ 1)  # both consumers are done with the last tile (and its index)
            _put_tile(tile_slot, tile, 1)  # published by kv_ready's arrive (release), read after the consumers' wait
            it = _bwd_produce_tile(desc_q, desc_do, desc_k, desc_v, desc_lse, desc_delta, q_smem, do_smem, k_smem,
                                   v_smem, lse_smem, delta_smem, kv_ready, kv_empty, q_ready, do_ready, qdo_empty,
                                   seq_q, seq_k, heads_q, group_size, padded_q, seg_ptr, stride_sb, stride_sp, b,
                                   kv_h, n_block, it, t_local, BLOCK_M, NUM_STAGES, NUM_CONSUMERS, CAUSAL, HAS_SEG,
                                   False)
            tile = _next_tile(tile, counter_ptr, num_tiles, True)  # claimed while the consumers work the ring
            t_local += 1
        mbarrier.wait(kv_empty, (t_local & 1) ^ 1)  # no tile left: a past-the-end index tells the consumers to stop
        _put_tile(tile_slot, num_tiles, 1)
        mbarrier.arrive(kv_ready)
    elif PERSISTENT:  # the ring's slot count runs on across tiles; K and V reload once the consumers are done
        it = 0
        t_local = 0
        for k in range(0, (num_tiles + gl.num_programs(0) - 1) // gl.num_programs(0)):
            tile = _walked_tile(k)
            if tile < num_tiles:
                b, kv_h, n_block = _tile_coords(tile, heads_k, num_n_blocks, batch_kv, l2_pairs, CAUSAL)
                it = _bwd_produce_tile(desc_q, desc_do, desc_k, desc_v, desc_lse, desc_delta, q_smem, do_smem,
                                       k_smem, v_smem, lse_smem, delta_smem, kv_ready, kv_empty, q_ready, do_ready,
                                       qdo_empty, seq_q, seq_k, heads_q, group_size, padded_q, seg_ptr, stride_sb,
                                       stride_sp, b, kv_h, n_block, it, t_local, BLOCK_M, NUM_STAGES, NUM_CONSUMERS,
                                       CAUSAL, HAS_SEG, PERSISTENT)
                t_local += 1
    else:
        b, kv_h, n_block = _program_coords(heads_k, num_n_blocks)
        _bwd_produce_tile(desc_q, desc_do, desc_k, desc_v, desc_lse, desc_delta, q_smem, do_smem, k_smem, v_smem,
                          lse_smem, delta_smem, kv_ready, kv_empty, q_ready, do_ready, qdo_empty, seq_q, seq_k,
                          heads_q, group_size, padded_q, seg_ptr, stride_sb, stride_sp, b, kv_h, n_block, 0, 0,
                          BLOCK_M, NUM_STAGES, NUM_CONSUMERS, CAUSAL, HAS_SEG, PERSISTENT)


@gluon.jit
def _bwd_produce_tile(desc_q, desc_do, desc_k, desc_v, desc_lse, desc_delta, q_smem, do_smem, k_smem, v_smem,
                      lse_smem, delta_smem, kv_ready, kv_empty, q_ready, do_ready, qdo_empty, seq_q, seq_k, heads_q,
                      group_size, padded_q, seg_ptr, stride_sb, stride_sp, b, kv_h, n_block, it, t_local,
                      BLOCK_M: gl.constexpr, NUM_STAGES: gl.constexpr, NUM_CONSUMERS: gl.constexpr,
                      CAUSAL: gl.constexpr, HAS_SEG: gl.constexpr, PERSISTENT: gl.constexpr):
    """One key block's loads: K and V, then Q/lse and dO/delta of every query block it meets, slots `it` on."""
    n0 = n_block * (_KEY_ROWS * NUM_CONSUMERS)
    if PERSISTENT:
        mbarrier.wait(kv_empty, (t_local & 1) ^ 1)  # every consumer is done with the last tile's K and V
    mbarrier.expect(kv_ready, desc_k.block_type.nbytes + desc_v.block_type.nbytes)
    _tma_load(desc_k, [b, kv_h, n0, 0], kv_ready, k_smem.index(0))
    _tma_load(desc_v, [b, kv_h, n0, 0], kv_ready, v_smem.index(0))
    m_lo, m_hi = _query_blocks(n0, seq_q, seq_k, BLOCK_M, CAUSAL)
    if HAS_SEG:  # the consumers narrow their loops alike
        m_lo, m_hi = _segment_query_blocks(m_lo, m_hi, seg_ptr + b.to(gl.int64) * stride_sb, stride_sp, n0, seq_k,
                                           _KEY_ROWS * NUM_CONSUMERS, BLOCK_M)
    n_m = m_hi - m_lo
    for i in range(group_size * n_m):
        h = kv_h * group_size + i // n_m
        m0 = (m_lo + i % n_m) * BLOCK_M
        row = (b * heads_q + h) * padded_q + m0  # in the padded lse/delta rows
        stage = (it + i) % NUM_STAGES
        phase = ((it + i) // NUM_STAGES) & 1
        mbarrier.wait(qdo_empty.index(stage), phase ^ 1)  # every consumer is done with this slot's last block
        mbarrier.expect(q_ready.index(stage), desc_q.block_type.nbytes + desc_lse.block_type.nbytes)
        _tma_load(desc_q, [b, h, m0, 0], q_ready.index(stage), q_smem.index(stage))
        _tma_load(desc_lse, [row], q_ready.index(stage), lse_smem.index(stage))
        mbarrier.expect(do_ready.index(stage), desc_do.block_type.nbytes + desc_delta.block_type.nbytes)
        _tma_load(desc_do, [b, h, m0, 0], do_ready.index(stage), do_smem.index(stage))
        _tma_load(desc_delta, [row], do_ready.index(stage), delta_smem.index(stage))
    return it + group_size * n_m


# ---------------------------------------------------------------------------------------------------------------
# Step 4: one query block of a consumer warpgroup.
# ---------------------------------------------------------------------------------------------------------------
@gluon.jit
def _bwd_step(k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, ds_smem, dq_smem, q_ready, do_ready, qdo_empty,
              ds_full, ds_free, desc_dq, dq_acc_ptr, dk, dv, i, m0, dq_row, n0w, qk_scale, seq_k, causal_offset,
              key_keep, key_seg, seg_row, seq_q, WG: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
              NUM_STAGES: gl.constexpr, NUM_CONSUMERS: gl.constexpr, CAUSAL: gl.constexpr, MASKED: gl.constexpr,
              DQ_SPLIT: gl.constexpr, DQ_TMA: gl.constexpr, HAS_KPM: gl.constexpr, HAS_SEG: gl.constexpr,
              FRESH_KV: gl.constexpr, EARLY_DQ_WAIT: gl.constexpr, s_layout: gl.constexpr, op_layout: gl.constexpr,
              dq_layout: gl.constexpr, dq_shape: gl.constexpr):
    stage = i % NUM_STAGES
    phase = (i // NUM_STAGES) & 1
    # FRESH_KV: the K and V views hang on a runtime index that is always 0 (i >> 31, i >= 0), so the compiler
    # derives their wgmma descriptors in the loop instead of hoisting them out and reloading them from local memory
    # every step (the d128 key loops' SASS: 12-20 such reloads a step without it, 0-6 with it; BENCHMARKS §2).
    kv = i >> 31 if FRESH_KV else 0
    k_block = k_smem.index(kv).reshape([NUM_CONSUMERS * _KEY_ROWS, HEAD_DIM])
    k_tile = k_block.slice(WG * _KEY_ROWS, _KEY_ROWS)
    v_tile = v_smem.index(kv).reshape([NUM_CONSUMERS * _KEY_ROWS, HEAD_DIM]).slice(WG * _KEY_ROWS, _KEY_ROWS)
    q_tile = q_smem.index(stage).reshape([BLOCK_M, HEAD_DIM])
    do_tile = do_smem.index(stage).reshape([BLOCK_M, HEAD_DIM])
    cols: gl.constexpr = gl.SliceLayout(0, s_layout)  # one value per query of the block

    # Step 4a: S^T = K Q^T and dP^T = V dO^T, both in flight at once.
    mbarrier.wait(q_ready.index(stage), phase)
    s_t = warpgroup_mma(k_tile, q_tile.permute((1, 0)), gl.zeros([_KEY_ROWS, BLOCK_M], gl.float32, s_layout),
                        use_acc=False, is_async=True)
    mbarrier.wait(do_ready.index(stage), phase)
    dp_t = warpgroup_mma(v_tile, do_tile.permute((1, 0)), gl.zeros([_KEY_ROWS, BLOCK_M], gl.float32, s_layout),
                         use_acc=False, is_async=True)
    s_t, dp_t = warpgroup_mma_wait(0, deps=(s_t, dp_t))

    # Step 4b: P^T = exp2(S^T * scale * log2(e) - lse); rows past Sq and rows that saw no key have lse = +inf, so
    # P = 0 there. dS^T = P^T * (dP^T - delta).
    lse = lse_smem.index(stage).load(cols)
    p_t = gl.exp2(s_t * qk_scale - gl.expand_dims(lse, 0))
    if MASKED:  # keys past Sk (TMA read zeros: their score is 0, not -inf) and, causal, keys after the query
        keys = gl.expand_dims(gl.arange(0, _KEY_ROWS, layout=gl.SliceLayout(1, s_layout)), 1)
        queries = gl.expand_dims(gl.arange(0, BLOCK_M, layout=cols), 0)
        if CAUSAL:  # key n0w + r is visible to query m0 + c iff r <= c + m0 + Sk - Sq - n0w (keys past Sk too)
            visible = keys <= queries + (m0 + causal_offset - n0w)
        else:
            visible = keys < seq_k - n0w
        if HAS_KPM:  # padding keys: P = 0 (the forward's lse left them out), so dK = dV = 0 there
            visible = visible & key_keep
        if HAS_SEG:  # packed sequences: a key and a query of different segments
            rows = m0 + gl.arange(0, BLOCK_M, layout=cols)
            query_seg = gl.load(seg_row + rows, mask=rows < seq_q, other=-2)
            visible = visible & (key_seg == gl.expand_dims(query_seg, 0))
        p_t = gl.where(visible, p_t, 0.0)
    delta = delta_smem.index(stage).load(cols)
    ds_t = (p_t * (dp_t - gl.expand_dims(delta, 0))).to(q_tile.dtype)

    # Step 4c: dV += P^T dO (P^T from registers); dS^T to shared memory, where it is the A operand of
    # dK += dS^T Q as it lies and, viewed transposed, of dQ = dS K (so dK's operand holds no registers).
    p_op = gl.convert_layout(p_t.to(q_tile.dtype), op_layout)
    dv = warpgroup_mma(p_op, do_tile, dv, is_async=True)
    if DQ_SPLIT != 0:  # two dS^T tiles of the whole key block, each consumer writing its own 64 rows
        buf = i % 2
        mbarrier.wait(ds_free.index(buf), ((i // 2) & 1) ^ 1)  # both consumers' dQ of two blocks ago read it
        ds_block = ds_smem.index(buf)
        ds_tile = ds_block.slice(WG * _KEY_ROWS, _KEY_ROWS)
    else:
        ds_tile = ds_smem.index(WG)
    ds_tile.store(ds_t)
    fence_async_shared()
    if DQ_SPLIT != 0:
        mbarrier.arrive(ds_full.index(buf))
    dk = warpgroup_mma(ds_tile, q_tile, dk, is_async=True)
    # dV done (dK may still run) before dQ takes its registers: P^T's operand registers are free by then.
    dv, p_op = warpgroup_mma_wait(1, deps=(dv, p_op))

    # Step 4d: this consumer's dQ share. "wg" (DQ_SPLIT 0): its own 64 keys, the whole [BLOCK_M, head dim].
    # "block": every key of the block (the other consumer's dS^T rows are waited for) and half of the dQ block,
    # split along the head dim (1: 64 columns, one 128-byte swizzle row of K) or the query rows (2: BLOCK_M 128).
    dq_zero = gl.zeros(dq_shape, gl.float32, dq_layout)
    DQ_ROW_OFF: gl.constexpr = WG * dq_shape[0] if DQ_SPLIT == 2 else 0  # of the share in the dQ block
    DQ_COL: gl.constexpr = WG * dq_shape[1] if DQ_SPLIT == 1 else 0
    if DQ_SPLIT == 1:
        mbarrier.wait(ds_full.index(buf), (i // 2) & 1)
        dq = warpgroup_mma(ds_block.permute((1, 0)), k_block.slice(DQ_COL, dq_shape[1], dim=1), dq_zero,
                           use_acc=False, is_async=True)
    elif DQ_SPLIT == 2:
        mbarrier.wait(ds_full.index(buf), (i // 2) & 1)
        dq = warpgroup_mma(ds_block.permute((1, 0)).slice(DQ_ROW_OFF, dq_shape[0]), k_block, dq_zero,
                           use_acc=False, is_async=True)
    else:
        dq = warpgroup_mma(ds_tile.permute((1, 0)), k_tile, dq_zero, use_acc=False, is_async=True)
    # EARLY_DQ_WAIT (TMA dQ): the last block's reduction is waited for while dK and dQ run, and the slots are given
    # back after the dQ tile is written, so that one warpgroup barrier serves both (five a step instead of six).
    EARLY: gl.constexpr = EARLY_DQ_WAIT and DQ_TMA
    if EARLY:
        tma.store_wait(0)  # the last block's reduction has read the dQ tile
    dk, dq = warpgroup_mma_wait(0, deps=(dk, dq))
    if not EARLY:
        if DQ_SPLIT != 0:
            mbarrier.arrive(ds_free.index(buf))
        mbarrier.arrive(qdo_empty.index(stage))  # Q, dO, lse and delta of this slot are no longer read

    # Step 4e: the dQ share into dQaccum.
    if DQ_TMA:
        dq_tile = dq_smem.index(WG)
        if not EARLY:
            tma.store_wait(0)
        dq_tile.store(dq)
        fence_async_shared()
        if EARLY:
            if DQ_SPLIT != 0:
                mbarrier.arrive(ds_free.index(buf))
            mbarrier.arrive(qdo_empty.index(stage))
        _tma_reduce_add(desc_dq, [dq_row + DQ_ROW_OFF, DQ_COL], dq_tile)
    else:
        rows = gl.expand_dims(gl.arange(0, dq_shape[0], layout=gl.SliceLayout(1, dq_layout)), 1)
        dcols = gl.expand_dims(gl.arange(0, dq_shape[1], layout=gl.SliceLayout(0, dq_layout)), 0)
        ptrs = dq_acc_ptr + ((dq_row + DQ_ROW_OFF).to(gl.int64) * HEAD_DIM + DQ_COL) + (rows * HEAD_DIM + dcols)
        gl.atomic_add(ptrs, dq, sem="relaxed")
    return dk, dv


# ---------------------------------------------------------------------------------------------------------------
# Step 5: a consumer warpgroup: its 64 keys over every query block of the group's heads, then dK and dV.
# ---------------------------------------------------------------------------------------------------------------
@gluon.jit
def _bwd_consumer(dk_ptr, dv_ptr, desc_dq, dq_acc_ptr, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem,
                  ds_smem, dq_smem, kv_ready, kv_empty, q_ready, do_ready, qdo_empty, ds_full, ds_free, qk_scale,
                  sm_scale, seq_q, seq_k, heads_q, heads_k, group_size, padded_q, num_n_blocks, num_tiles, batch_kv,
                  l2_pairs, head_dim, stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs, kpm_ptr,
                  stride_mb, stride_mn, seg_ptr, stride_sb, stride_sp, tile_slot,
                  WG: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr,
                  NUM_CONSUMERS: gl.constexpr, CAUSAL: gl.constexpr, DQ_SPLIT: gl.constexpr,
                  DQ_TMA: gl.constexpr, HAS_KPM: gl.constexpr, HAS_SEG: gl.constexpr, PERSISTENT: gl.constexpr,
                  FRESH_KV: gl.constexpr, EARLY_DQ_WAIT: gl.constexpr, DYNAMIC: gl.constexpr):
    if DYNAMIC:  # the tile the producer names with each kv_ready phase (past the end: stop)
        it = 0
        t_local = 0
        mbarrier.wait(kv_ready, 0)
        tile = _get_tile(tile_slot)
        while tile < num_tiles:
            b, kv_h, n_block = _tile_coords(tile, heads_k, num_n_blocks, batch_kv, l2_pairs, CAUSAL)
            it = _bwd_consume_tile(dk_ptr, dv_ptr, desc_dq, dq_acc_ptr, k_smem, v_smem, q_smem, do_smem, lse_smem,
                                   delta_smem, ds_smem, dq_smem, kv_ready, kv_empty, q_ready, do_ready, qdo_empty,
                                   ds_full, ds_free, qk_scale, sm_scale, seq_q, seq_k, heads_q, group_size, padded_q,
                                   head_dim, stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs,
                                   kpm_ptr, stride_mb, stride_mn, seg_ptr, stride_sb, stride_sp, b, kv_h, n_block, it,
                                   t_local, WG, BLOCK_M, HEAD_DIM, NUM_STAGES, NUM_CONSUMERS, CAUSAL, DQ_SPLIT,
                                   DQ_TMA, HAS_KPM, HAS_SEG, True, FRESH_KV, EARLY_DQ_WAIT)
            t_local += 1
            mbarrier.wait(kv_ready, t_local & 1)
            tile = _get_tile(tile_slot)
    elif PERSISTENT:  # the tile sequence the producer walks; a tile's dK/dV stores overlap the next tile's loads
        it = 0
        t_local = 0
        for k in range(0, (num_tiles + gl.num_programs(0) - 1) // gl.num_programs(0)):
            tile = _walked_tile(k)
            if tile < num_tiles:
                b, kv_h, n_block = _tile_coords(tile, heads_k, num_n_blocks, batch_kv, l2_pairs, CAUSAL)
                it = _bwd_consume_tile(dk_ptr, dv_ptr, desc_dq, dq_acc_ptr, k_smem, v_smem, q_smem, do_smem,
                                       lse_smem, delta_smem, ds_smem, dq_smem, kv_ready, kv_empty, q_ready, do_ready,
                                       qdo_empty, ds_full, ds_free, qk_scale, sm_scale, seq_q, seq_k, heads_q,
                                       group_size, padded_q, head_dim, stride_dkb, stride_dkh, stride_dks,
                                       stride_dvb, stride_dvh, stride_dvs, kpm_ptr, stride_mb, stride_mn, seg_ptr,
                                       stride_sb, stride_sp, b, kv_h, n_block, it, t_local, WG, BLOCK_M, HEAD_DIM,
                                       NUM_STAGES, NUM_CONSUMERS, CAUSAL, DQ_SPLIT, DQ_TMA, HAS_KPM, HAS_SEG,
                                       PERSISTENT, FRESH_KV, EARLY_DQ_WAIT)
                t_local += 1
    else:
        b, kv_h, n_block = _program_coords(heads_k, num_n_blocks)
        _bwd_consume_tile(dk_ptr, dv_ptr, desc_dq, dq_acc_ptr, k_smem, v_smem, q_smem, do_smem, lse_smem,
                          delta_smem, ds_smem, dq_smem, kv_ready, kv_empty, q_ready, do_ready, qdo_empty, ds_full,
                          ds_free, qk_scale, sm_scale, seq_q, seq_k, heads_q, group_size, padded_q, head_dim,
                          stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs, kpm_ptr, stride_mb,
                          stride_mn, seg_ptr, stride_sb, stride_sp, b, kv_h, n_block, 0, 0, WG, BLOCK_M, HEAD_DIM,
                          NUM_STAGES, NUM_CONSUMERS, CAUSAL, DQ_SPLIT, DQ_TMA, HAS_KPM, HAS_SEG, PERSISTENT,
                          FRESH_KV, EARLY_DQ_WAIT)
    if DQ_TMA:
        tma.store_wait(0)


@gluon.jit
def _bwd_consume_tile(dk_ptr, dv_ptr, desc_dq, dq_acc_ptr, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem,
                      ds_smem, dq_smem, kv_ready, kv_empty, q_ready, do_ready, qdo_empty, ds_full, ds_free, qk_scale,
                      sm_scale, seq_q, seq_k, heads_q, group_size, padded_q, head_dim, stride_dkb, stride_dkh,
                      stride_dks, stride_dvb, stride_dvh, stride_dvs, kpm_ptr, stride_mb, stride_mn, seg_ptr,
                      stride_sb, stride_sp, b, kv_h, n_block, it, t_local,
                      WG: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr,
                      NUM_CONSUMERS: gl.constexpr, CAUSAL: gl.constexpr, DQ_SPLIT: gl.constexpr,
                      DQ_TMA: gl.constexpr, HAS_KPM: gl.constexpr, HAS_SEG: gl.constexpr, PERSISTENT: gl.constexpr,
                      FRESH_KV: gl.constexpr, EARLY_DQ_WAIT: gl.constexpr):
    """One key block: this warpgroup's 64 keys over every query block of the group's heads (ring slots `it` on),
    then dK and dV. Returns the slot count after it."""
    # wgmma accumulators: 4 warps stacked along M (16 rows each), instruction N = the tile's N.
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_M, 16])
    kv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HEAD_DIM, 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout, k_width=2)
    dq_shape: gl.constexpr = desc_dq.block_type.shape  # the dQ share: [rows, columns]
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, dq_shape[1], 16])

    n0 = n_block * (_KEY_ROWS * NUM_CONSUMERS)
    n0w = n0 + WG * _KEY_ROWS
    causal_offset = seq_k - seq_q
    m_lo, m_hi = _query_blocks(n0, seq_q, seq_k, BLOCK_M, CAUSAL)
    seg_row = seg_ptr + b.to(gl.int64) * stride_sb  # this batch row's segment ids (plane 0)
    if HAS_SEG:  # the producer's query blocks: those of the key block's own sequences
        m_lo, m_hi = _segment_query_blocks(m_lo, m_hi, seg_row, stride_sp, n0, seq_k, _KEY_ROWS * NUM_CONSUMERS,
                                           BLOCK_M)
    n_m = m_hi - m_lo
    n_masked = _masked_blocks(n0w, m_lo, m_hi, seq_q, seq_k, BLOCK_M, CAUSAL)
    # The key padding mask of this consumer's 64 keys, read once: where one of them is padding every query block
    # takes the masked step.
    key_idx = n0w + gl.arange(0, _KEY_ROWS, layout=gl.SliceLayout(1, s_layout))
    if HAS_KPM:
        attend = gl.load(kpm_ptr + b.to(gl.int64) * stride_mb + key_idx.to(gl.int64) * stride_mn,
                         mask=key_idx < seq_k, other=1)
        n_padding = gl.sum(gl.where(attend == 0, 1, 0), axis=0)
        n_masked = gl.where(n_padding > 0, n_m, n_masked)
        key_keep = gl.expand_dims(attend != 0, 1)
    else:
        key_keep = gl.expand_dims(key_idx < seq_k, 1)  # not read
    key_seg = gl.expand_dims(key_idx, 1)  # not read without HAS_SEG
    if HAS_SEG:  # every query block compares segments
        key_seg = gl.expand_dims(gl.load(seg_row + key_idx, mask=key_idx < seq_k, other=-1), 1)
        n_masked = n_m

    dk = gl.zeros([_KEY_ROWS, HEAD_DIM], gl.float32, kv_layout)
    dv = gl.zeros([_KEY_ROWS, HEAD_DIM], gl.float32, kv_layout)
    mbarrier.wait(kv_ready, t_local & 1)
    for g in range(group_size):  # GQA: the group's query heads, one after the other, into the same dK/dV
        row0 = (b * heads_q + kv_h * group_size + g) * padded_q
        for j in range(n_masked):
            m0 = (m_lo + j) * BLOCK_M
            dk, dv = _bwd_step(k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, ds_smem, dq_smem, q_ready,
                               do_ready, qdo_empty, ds_full, ds_free, desc_dq, dq_acc_ptr, dk, dv,
                               it + g * n_m + j, m0, row0 + m0, n0w, qk_scale, seq_k, causal_offset, key_keep,
                               key_seg, seg_row, seq_q,
                               WG, BLOCK_M, HEAD_DIM, NUM_STAGES, NUM_CONSUMERS, CAUSAL, True, DQ_SPLIT, DQ_TMA,
                               HAS_KPM, HAS_SEG, FRESH_KV, EARLY_DQ_WAIT, s_layout, op_layout, dq_layout, dq_shape)
        for j in range(n_masked, n_m):
            m0 = (m_lo + j) * BLOCK_M
            dk, dv = _bwd_step(k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, ds_smem, dq_smem, q_ready,
                               do_ready, qdo_empty, ds_full, ds_free, desc_dq, dq_acc_ptr, dk, dv,
                               it + g * n_m + j, m0, row0 + m0, n0w, qk_scale, seq_k, causal_offset, key_keep,
                               key_seg, seg_row, seq_q,
                               WG, BLOCK_M, HEAD_DIM, NUM_STAGES, NUM_CONSUMERS, CAUSAL, False, DQ_SPLIT, DQ_TMA,
                               HAS_KPM, HAS_SEG, FRESH_KV, EARLY_DQ_WAIT, s_layout, op_layout, dq_layout, dq_shape)
    if PERSISTENT:  # the last step's wgmmas have read K and V: the producer may load the next tile's
        mbarrier.arrive(kv_empty)

    # Step 5a: dK (scaled) and dV, straight from registers; rows past Sk and columns past the head dim are not
    # stored.
    rows = gl.expand_dims(n0w + gl.arange(0, _KEY_ROWS, layout=gl.SliceLayout(1, kv_layout)), 1)
    dcols = gl.expand_dims(gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, kv_layout)), 0)
    keep = (rows < seq_k) & (dcols < head_dim)
    dk_base = dk_ptr + b.to(gl.int64) * stride_dkb + kv_h.to(gl.int64) * stride_dkh
    gl.store(dk_base + rows.to(gl.int64) * stride_dks + dcols, (dk * sm_scale).to(dk_ptr.dtype.element_ty),
             mask=keep)
    dv_base = dv_ptr + b.to(gl.int64) * stride_dvb + kv_h.to(gl.int64) * stride_dvh
    gl.store(dv_base + rows.to(gl.int64) * stride_dvs + dcols, dv.to(dv_ptr.dtype.element_ty), mask=keep)
    return it + group_size * n_m


# ---------------------------------------------------------------------------------------------------------------
# Step 6: the kernel: shared memory, barriers, and the partitions.
# ---------------------------------------------------------------------------------------------------------------
# Lengths, head counts and strides are not specialised on (== 1, multiple of 16): one compile per config and dtype.
@gluon.jit(do_not_specialize=["seq_q", "seq_k", "heads_q", "heads_k", "group_size", "padded_q", "num_n_blocks",
                              "num_tiles", "batch_kv", "l2_pairs", "head_dim", "stride_dkb", "stride_dkh",
                              "stride_dks", "stride_dvb", "stride_dvh", "stride_dvs", "stride_mb", "stride_mn",
                              "stride_sb", "stride_sp"])
def _attn_bwd_sm90(desc_q, desc_k, desc_v, desc_do, desc_lse, desc_delta, desc_dq, dq_acc_ptr, dk_ptr, dv_ptr,
                   counter_ptr, qk_scale, sm_scale, seq_q, seq_k, heads_q, heads_k, group_size, padded_q,
                   num_n_blocks, num_tiles, batch_kv, l2_pairs, head_dim, stride_dkb, stride_dkh, stride_dks,
                   stride_dvb, stride_dvh, stride_dvs, kpm_ptr, stride_mb, stride_mn, seg_ptr, stride_sb, stride_sp,
                   BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr,
                   NUM_CONSUMERS: gl.constexpr, CAUSAL: gl.constexpr,
                   DQ_SPLIT: gl.constexpr, DQ_TMA: gl.constexpr, HAS_KPM: gl.constexpr, HAS_SEG: gl.constexpr,
                   CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, PERSISTENT: gl.constexpr,
                   FRESH_KV: gl.constexpr, EARLY_DQ_WAIT: gl.constexpr, DYNAMIC: gl.constexpr):
    dtype: gl.constexpr = desc_q.dtype
    # The whole key block, behind a leading dimension of one that the consumers index (see FRESH_KV).
    k_smem = gl.allocate_shared_memory(dtype, [1] + desc_k.block_type.shape, desc_k.layout)
    v_smem = gl.allocate_shared_memory(dtype, [1] + desc_v.block_type.shape, desc_v.layout)
    q_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, 1, 1, BLOCK_M, HEAD_DIM], desc_q.layout)
    do_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, 1, 1, BLOCK_M, HEAD_DIM], desc_do.layout)
    lse_smem = gl.allocate_shared_memory(gl.float32, [NUM_STAGES, BLOCK_M], desc_lse.layout)
    delta_smem = gl.allocate_shared_memory(gl.float32, [NUM_STAGES, BLOCK_M], desc_delta.layout)
    if DQ_SPLIT != 0:  # two tiles of the whole key block's dS^T
        ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([NUM_CONSUMERS * _KEY_ROWS, BLOCK_M], dtype)
        ds_smem = gl.allocate_shared_memory(dtype, [2, NUM_CONSUMERS * _KEY_ROWS, BLOCK_M], ds_layout)
    else:  # one tile per consumer
        ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([_KEY_ROWS, BLOCK_M], dtype)
        ds_smem = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS, _KEY_ROWS, BLOCK_M], ds_layout)
    if DQ_TMA:
        dq_smem = gl.allocate_shared_memory(gl.float32, [NUM_CONSUMERS] + desc_dq.block_type.shape, desc_dq.layout)
    else:
        dq_smem = ds_smem  # not used
    kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())  # (persistent) K/V reusable
    tile_slot = gl.allocate_shared_memory(gl.int32, [1], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))  # (DYNAMIC)
    q_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    do_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    qdo_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    ds_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    ds_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_ready, count=1)
    mbarrier.init(kv_empty, count=NUM_CONSUMERS)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(do_ready.index(i), count=1)
        mbarrier.init(qdo_empty.index(i), count=NUM_CONSUMERS)  # one arrive per consumer warpgroup
    for i in gl.static_range(2):
        mbarrier.init(ds_full.index(i), count=NUM_CONSUMERS)
        mbarrier.init(ds_free.index(i), count=NUM_CONSUMERS)
    fence_async_shared()

    gl.static_assert(NUM_CONSUMERS == 1 or NUM_CONSUMERS == 2)
    if NUM_CONSUMERS == 2:
        gl.warp_specialize([
            (_bwd_consumer, (dk_ptr, dv_ptr, desc_dq, dq_acc_ptr, k_smem, v_smem, q_smem, do_smem, lse_smem,
                             delta_smem, ds_smem, dq_smem, kv_ready, kv_empty, q_ready, do_ready, qdo_empty,
                             ds_full, ds_free, qk_scale, sm_scale, seq_q, seq_k, heads_q, heads_k, group_size,
                             padded_q, num_n_blocks, num_tiles, batch_kv, l2_pairs, head_dim, stride_dkb, stride_dkh,
                             stride_dks, stride_dvb, stride_dvh, stride_dvs, kpm_ptr, stride_mb, stride_mn, seg_ptr,
                             stride_sb, stride_sp, tile_slot, 0, BLOCK_M, HEAD_DIM, NUM_STAGES, NUM_CONSUMERS, CAUSAL,
                             DQ_SPLIT, DQ_TMA, HAS_KPM, HAS_SEG, PERSISTENT, FRESH_KV, EARLY_DQ_WAIT,
                             DYNAMIC)),
            (_bwd_consumer, (dk_ptr, dv_ptr, desc_dq, dq_acc_ptr, k_smem, v_smem, q_smem, do_smem, lse_smem,
                             delta_smem, ds_smem, dq_smem, kv_ready, kv_empty, q_ready, do_ready, qdo_empty,
                             ds_full, ds_free, qk_scale, sm_scale, seq_q, seq_k, heads_q, heads_k, group_size,
                             padded_q, num_n_blocks, num_tiles, batch_kv, l2_pairs, head_dim, stride_dkb, stride_dkh,
                             stride_dks, stride_dvb, stride_dvh, stride_dvs, kpm_ptr, stride_mb, stride_mn, seg_ptr,
                             stride_sb, stride_sp, tile_slot, 1, BLOCK_M, HEAD_DIM, NUM_STAGES, NUM_CONSUMERS, CAUSAL,
                             DQ_SPLIT, DQ_TMA, HAS_KPM, HAS_SEG, PERSISTENT, FRESH_KV, EARLY_DQ_WAIT,
                             DYNAMIC)),
            (_bwd_producer, (desc_q, desc_do, desc_k, desc_v, desc_lse, desc_delta, q_smem, do_smem, k_smem, v_smem,
                             lse_smem, delta_smem, kv_ready, kv_empty, q_ready, do_ready, qdo_empty, seq_q, seq_k,
                             heads_q, heads_k, group_size, padded_q, num_n_blocks, num_tiles, batch_kv, l2_pairs,
                             seg_ptr, stride_sb, stride_sp, tile_slot, counter_ptr, BLOCK_M, NUM_STAGES,
                             NUM_CONSUMERS, CAUSAL, HAS_SEG, PERSISTENT, DYNAMIC)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([
            (_bwd_consumer, (dk_ptr, dv_ptr, desc_dq, dq_acc_ptr, k_smem, v_smem, q_smem, do_smem, lse_smem,
                             delta_smem, ds_smem, dq_smem, kv_ready, kv_empty, q_ready, do_ready, qdo_empty,
                             ds_full, ds_free, qk_scale, sm_scale, seq_q, seq_k, heads_q, heads_k, group_size,
                             padded_q, num_n_blocks, num_tiles, batch_kv, l2_pairs, head_dim, stride_dkb, stride_dkh,
                             stride_dks, stride_dvb, stride_dvh, stride_dvs, kpm_ptr, stride_mb, stride_mn, seg_ptr,
                             stride_sb, stride_sp, tile_slot, 0, BLOCK_M, HEAD_DIM, NUM_STAGES, NUM_CONSUMERS, CAUSAL,
                             DQ_SPLIT, DQ_TMA, HAS_KPM, HAS_SEG, PERSISTENT, FRESH_KV, EARLY_DQ_WAIT,
                             DYNAMIC)),
            (_bwd_producer, (desc_q, desc_do, desc_k, desc_v, desc_lse, desc_delta, q_smem, do_smem, k_smem, v_smem,
                             lse_smem, delta_smem, kv_ready, kv_empty, q_ready, do_ready, qdo_empty, seq_q, seq_k,
                             heads_q, heads_k, group_size, padded_q, num_n_blocks, num_tiles, batch_kv, l2_pairs,
                             seg_ptr, stride_sb, stride_sp, tile_slot, counter_ptr, BLOCK_M, NUM_STAGES,
                             NUM_CONSUMERS, CAUSAL, HAS_SEG, PERSISTENT, DYNAMIC)),
        ], [1], [PRODUCER_REGS])


# ---------------------------------------------------------------------------------------------------------------
# Step 7: the same work without warp specialisation: one partition of 8 warps (both warpgroups) owns the 128-key
# block as one [128, ...] tile, issues its own TMA loads NUM_STAGES - 1 query blocks ahead, and runs the steps in
# lockstep. No producer warp, so no register reallocation either: 255 registers a thread. The dQ accumulator
# [BLOCK_M, head dim] spreads over the 8 warps (the two warpgroups take halves of the head dim at BLOCK_M 64,
# of the rows at 128), which is the "block" split without an exchange protocol: the CTA barrier before the dQ
# wgmma orders the dS^T stores.
# ---------------------------------------------------------------------------------------------------------------
@gluon.jit
def _plain_load(desc_q, desc_do, desc_lse, desc_delta, q_smem, do_smem, lse_smem, delta_smem, ready, idx, total,
                b, kv_h, heads_q, group_size, padded_q, m_lo, n_m, BLOCK_M: gl.constexpr, NUM_STAGES: gl.constexpr):
    """Issue query block `idx`'s Q, dO, lse and delta into its slot (nothing past the last one)."""
    valid = idx < total
    safe = gl.minimum(idx, total - 1)
    h = kv_h * group_size + safe // n_m
    m0 = (m_lo + safe % n_m) * BLOCK_M
    row = (b * heads_q + h) * padded_q + m0
    stage = idx % NUM_STAGES
    bar = ready.index(stage)
    BYTES: gl.constexpr = (desc_q.block_type.nbytes + desc_do.block_type.nbytes + desc_lse.block_type.nbytes
                           + desc_delta.block_type.nbytes)
    mbarrier.expect(bar, BYTES, pred=valid)
    _tma_load(desc_q, [b, h, m0, 0], bar, q_smem.index(stage), pred=valid)
    _tma_load(desc_do, [b, h, m0, 0], bar, do_smem.index(stage), pred=valid)
    _tma_load(desc_lse, [row], bar, lse_smem.index(stage), pred=valid)
    _tma_load(desc_delta, [row], bar, delta_smem.index(stage), pred=valid)


@gluon.jit
def _plain_step(k_block, v_block, q_smem, do_smem, lse_smem, delta_smem, ds_smem, dq_smem, ready, desc_dq,
                dq_acc_ptr, dk, dv, i, m0, dq_row, n0, qk_scale, seq_k, causal_offset,
                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr,
                CAUSAL: gl.constexpr, MASKED: gl.constexpr, DQ_TMA: gl.constexpr, s_layout: gl.constexpr,
                op_layout: gl.constexpr, dq_layout: gl.constexpr):
    """_bwd_step for the whole key block at once (its Steps 4a-4e)."""
    stage = i % NUM_STAGES
    q_tile = q_smem.index(stage).reshape([BLOCK_M, HEAD_DIM])
    do_tile = do_smem.index(stage).reshape([BLOCK_M, HEAD_DIM])
    cols: gl.constexpr = gl.SliceLayout(0, s_layout)
    mbarrier.wait(ready.index(stage), (i // NUM_STAGES) & 1)
    s_t = warpgroup_mma(k_block, q_tile.permute((1, 0)), gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout),
                        use_acc=False, is_async=True)
    dp_t = warpgroup_mma(v_block, do_tile.permute((1, 0)), gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout),
                         use_acc=False, is_async=True)
    s_t, dp_t = warpgroup_mma_wait(0, deps=(s_t, dp_t))
    lse = lse_smem.index(stage).load(cols)
    p_t = gl.exp2(s_t * qk_scale - gl.expand_dims(lse, 0))
    if MASKED:
        keys = gl.expand_dims(gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout)), 1)
        queries = gl.expand_dims(gl.arange(0, BLOCK_M, layout=cols), 0)
        if CAUSAL:
            visible = keys <= queries + (m0 + causal_offset - n0)
        else:
            visible = keys < seq_k - n0
        p_t = gl.where(visible, p_t, 0.0)
    delta = delta_smem.index(stage).load(cols)
    ds_t = (p_t * (dp_t - gl.expand_dims(delta, 0))).to(q_tile.dtype)
    p_op = gl.convert_layout(p_t.to(q_tile.dtype), op_layout)
    dv = warpgroup_mma(p_op, do_tile, dv, is_async=True)
    ds_smem.store(ds_t)
    fence_async_shared()
    dk = warpgroup_mma(ds_smem, q_tile, dk, is_async=True)
    dv, p_op = warpgroup_mma_wait(1, deps=(dv, p_op))
    dq = warpgroup_mma(ds_smem.permute((1, 0)), k_block, gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, dq_layout),
                       use_acc=False, is_async=True)
    dk, dq = warpgroup_mma_wait(0, deps=(dk, dq))
    if DQ_TMA:
        tma.store_wait(0)
        dq_smem.store(dq)
        fence_async_shared()
        _tma_reduce_add(desc_dq, [dq_row, 0], dq_smem)
    else:
        rows = gl.expand_dims(gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, dq_layout)), 1)
        dcols = gl.expand_dims(gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, dq_layout)), 0)
        gl.atomic_add(dq_acc_ptr + dq_row.to(gl.int64) * HEAD_DIM + (rows * HEAD_DIM + dcols), dq, sem="relaxed")
    return dk, dv


@gluon.jit(do_not_specialize=["seq_q", "seq_k", "heads_q", "heads_k", "group_size", "padded_q", "num_n_blocks",
                              "head_dim", "stride_dkb", "stride_dkh", "stride_dks", "stride_dvb", "stride_dvh",
                              "stride_dvs"])
def _attn_bwd_sm90_plain(desc_q, desc_k, desc_v, desc_do, desc_lse, desc_delta, desc_dq, dq_acc_ptr, dk_ptr, dv_ptr,
                         qk_scale, sm_scale, seq_q, seq_k, heads_q, heads_k, group_size, padded_q, num_n_blocks,
                         head_dim, stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs,
                         BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr,
                         CAUSAL: gl.constexpr, DQ_TMA: gl.constexpr):
    dtype: gl.constexpr = desc_q.dtype
    BLOCK_N: gl.constexpr = desc_k.block_type.shape[2]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1],
                                                       instr_shape=[16, BLOCK_M, 16])
    kv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1],
                                                        instr_shape=[16, HEAD_DIM, 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout, k_width=2)
    DQ_WARPS: gl.constexpr = [4, 2] if BLOCK_M == 64 else [8, 1]
    # At d128 (BLOCK_M 64) ptxas spills about 70 values per block with n64 dQ instructions, 5 with n32 (measured).
    DQ_N: gl.constexpr = 32 if HEAD_DIM == 128 and BLOCK_M == 64 else HEAD_DIM // DQ_WARPS[1]
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=DQ_WARPS,
                                                        instr_shape=[16, DQ_N, 16])

    # Step 7a: shared memory and barriers; K and V, and the first NUM_STAGES - 1 query blocks, on their way.
    k_smem = gl.allocate_shared_memory(dtype, desc_k.block_type.shape, desc_k.layout)
    v_smem = gl.allocate_shared_memory(dtype, desc_v.block_type.shape, desc_v.layout)
    q_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, 1, 1, BLOCK_M, HEAD_DIM], desc_q.layout)
    do_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, 1, 1, BLOCK_M, HEAD_DIM], desc_do.layout)
    lse_smem = gl.allocate_shared_memory(gl.float32, [NUM_STAGES, BLOCK_M], desc_lse.layout)
    delta_smem = gl.allocate_shared_memory(gl.float32, [NUM_STAGES, BLOCK_M], desc_delta.layout)
    ds_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M],
                                        gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype))
    if DQ_TMA:
        dq_smem = gl.allocate_shared_memory(gl.float32, desc_dq.block_type.shape, desc_dq.layout)
    else:
        dq_smem = ds_smem  # not used
    kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_ready, count=1)
    for st in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(st), count=1)
    fence_async_shared()

    b, kv_h, n_block = _program_coords(heads_k, num_n_blocks)
    n0 = n_block * BLOCK_N
    causal_offset = seq_k - seq_q
    m_lo, m_hi = _query_blocks(n0, seq_q, seq_k, BLOCK_M, CAUSAL)
    n_m = m_hi - m_lo
    total = group_size * n_m
    # The masked blocks for all BLOCK_N keys: those for its last 64 (the most masked) rows.
    n_masked = _masked_blocks(n0 + BLOCK_N - _KEY_ROWS, m_lo, m_hi, seq_q, seq_k, BLOCK_M, CAUSAL)
    mbarrier.expect(kv_ready, desc_k.block_type.nbytes + desc_v.block_type.nbytes)
    _tma_load(desc_k, [b, kv_h, n0, 0], kv_ready, k_smem)
    _tma_load(desc_v, [b, kv_h, n0, 0], kv_ready, v_smem)
    for idx in gl.static_range(NUM_STAGES - 1):
        _plain_load(desc_q, desc_do, desc_lse, desc_delta, q_smem, do_smem, lse_smem, delta_smem, ready, idx, total,
                    b, kv_h, heads_q, group_size, padded_q, m_lo, n_m, BLOCK_M, NUM_STAGES)

    # Step 7b: the query blocks; each first refills the slot its predecessor freed.
    k_block = k_smem.reshape([BLOCK_N, HEAD_DIM])
    v_block = v_smem.reshape([BLOCK_N, HEAD_DIM])
    dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, kv_layout)
    dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, kv_layout)
    mbarrier.wait(kv_ready, 0)
    for g in range(group_size):
        row0 = (b * heads_q + kv_h * group_size + g) * padded_q
        for j in range(n_masked):
            i = g * n_m + j
            _plain_load(desc_q, desc_do, desc_lse, desc_delta, q_smem, do_smem, lse_smem, delta_smem, ready,
                        i + NUM_STAGES - 1, total, b, kv_h, heads_q, group_size, padded_q, m_lo, n_m, BLOCK_M,
                        NUM_STAGES)
            m0 = (m_lo + j) * BLOCK_M
            dk, dv = _plain_step(k_block, v_block, q_smem, do_smem, lse_smem, delta_smem, ds_smem, dq_smem, ready,
                                 desc_dq, dq_acc_ptr, dk, dv, i, m0, row0 + m0, n0, qk_scale, seq_k, causal_offset,
                                 BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES, CAUSAL, True, DQ_TMA, s_layout, op_layout,
                                 dq_layout)
        for j in range(n_masked, n_m):
            i = g * n_m + j
            _plain_load(desc_q, desc_do, desc_lse, desc_delta, q_smem, do_smem, lse_smem, delta_smem, ready,
                        i + NUM_STAGES - 1, total, b, kv_h, heads_q, group_size, padded_q, m_lo, n_m, BLOCK_M,
                        NUM_STAGES)
            m0 = (m_lo + j) * BLOCK_M
            dk, dv = _plain_step(k_block, v_block, q_smem, do_smem, lse_smem, delta_smem, ds_smem, dq_smem, ready,
                                 desc_dq, dq_acc_ptr, dk, dv, i, m0, row0 + m0, n0, qk_scale, seq_k, causal_offset,
                                 BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES, CAUSAL, False, DQ_TMA, s_layout, op_layout,
                                 dq_layout)

    # Step 7c: dK (scaled) and dV from registers, as _bwd_consumer's Step 5a.
    rows = gl.expand_dims(n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, kv_layout)), 1)
    dcols = gl.expand_dims(gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, kv_layout)), 0)
    keep = (rows < seq_k) & (dcols < head_dim)
    dk_base = dk_ptr + b.to(gl.int64) * stride_dkb + kv_h.to(gl.int64) * stride_dkh
    gl.store(dk_base + rows.to(gl.int64) * stride_dks + dcols, (dk * sm_scale).to(dk_ptr.dtype.element_ty),
             mask=keep)
    dv_base = dv_ptr + b.to(gl.int64) * stride_dvb + kv_h.to(gl.int64) * stride_dvh
    gl.store(dv_base + rows.to(gl.int64) * stride_dvs + dcols, dv.to(dv_ptr.dtype.element_ty), mask=keep)
    if DQ_TMA:
        tma.store_wait(0)


# ---------------------------------------------------------------------------------------------------------------
# Step 8: the host side.
# ---------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _float32_layout(rows: int, cols: int | None):
    """The shared layout of a float32 [rows] (cols None: unswizzled) or [rows, cols] block, worked out once."""
    if cols is None:
        return gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)
    return gl.NVMMASharedLayout.get_default_for([rows, cols], gl.float32)


def _row_descriptor(t: torch.Tensor, rows: int):
    """A flat float32 vector (lse, delta) read `rows` at a time."""
    return TensorDescriptor(t, [t.numel()], [1], [rows], _float32_layout(rows, None))


def _dq_descriptor(t: torch.Tensor, rows: int, cols: int):
    """dQaccum [rows of every head, kernel head dim], float32, reduced into a [rows, cols] block at a time."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [rows, cols], _float32_layout(rows, cols))


def _l2_pairs(batch_kv: int, group_size: int, seq_q: int, width: int, element_size: int) -> int:
    """(batch, K/V head) pairs per causal L2 section of a persistent launch: as many as keep their group's Q and dO
    within L2_KV_BYTES (a power of two, at least one)."""
    qdo_bytes = 2 * group_size * seq_q * width * element_size
    fit = max(1, L2_KV_BYTES // max(qdo_bytes, 1))
    return max(1, min(batch_kv, 1 << (fit.bit_length() - 1)))


def _empty_as(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of t's shape and dtype whose dims lie in memory in t's order (a [B, S, H, D] projection
    viewed as [B, H, S, D] gives the same view), by torch.empty (which the tests poison)."""
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))
    return torch.empty([t.shape[d] for d in order], device=t.device, dtype=t.dtype).permute(
        [order.index(d) for d in range(t.dim())])


def _constexprs(config: Sm90BwdConfig, head_dim: int, causal: bool, key_padding_mask: bool = False,
                segment_ids: bool = False) -> dict:
    if config.num_consumers not in (1, 2):
        raise ValueError("num_consumers is 1 or 2")
    if config.dq not in DQ_SCHEMES or config.dq_write not in DQ_WRITES:
        raise ValueError(f"dq is one of {DQ_SCHEMES}, dq_write one of {DQ_WRITES}")
    if config.block_m not in (64, 128):
        raise ValueError("block_m is 64 or 128")
    if config.dq == "block" and config.num_consumers != 2:
        raise ValueError("the block dQ needs two consumers")
    if config.dynamic and not config.persistent:
        raise ValueError("the dynamic schedule hands out a persistent launch's tiles")
    if not config.warp_specialize:
        if config.num_consumers != 2 or config.dq != "block":
            raise ValueError("without warp specialisation the program is two warpgroups with the block dQ")
        if key_padding_mask or segment_ids:
            raise ValueError("the kernel without warp specialisation takes no key padding mask or segment ids")
        if config.persistent or config.fresh_kv or config.early_dq_wait:
            raise ValueError("persistence, fresh K/V descriptors and the early dQ wait need warp specialisation")
        return dict(BLOCK_M=config.block_m, HEAD_DIM=KERNEL_HEAD_DIM[head_dim], NUM_STAGES=config.num_stages,
                    CAUSAL=causal, DQ_TMA=config.dq_write == "tma")
    if config.dq_split() == 1 and KERNEL_HEAD_DIM[head_dim] != 128:
        raise ValueError("the block dQ at BLOCK_M 64 splits the head dim in 64-column halves: the 128-wide kernel")
    return dict(BLOCK_M=config.block_m, HEAD_DIM=KERNEL_HEAD_DIM[head_dim], NUM_STAGES=config.num_stages,
                NUM_CONSUMERS=config.num_consumers, CAUSAL=causal, DQ_SPLIT=config.dq_split(),
                DQ_TMA=config.dq_write == "tma", HAS_KPM=key_padding_mask, HAS_SEG=segment_ids,
                CONSUMER_REGS=config.consumer_regs, PRODUCER_REGS=config.producer_regs, PERSISTENT=config.persistent,
                FRESH_KV=config.fresh_kv, EARLY_DQ_WAIT=config.early_dq_wait, DYNAMIC=config.dynamic)


# (config, head_dim, causal, dtype[, masks]) -> the compiled main kernel of the last launch, for inspection.
COMPILED: dict = {}
_launch_prep = CachedLauncher(_bwd_prep_kernel)  # plain Triton: launched without the JIT's per-call binding
_launch_convert = CachedLauncher(_bwd_dq_convert_kernel)


def sm90_backward_eligible(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor) -> bool:
    """Gluon present, a Hopper GPU (wgmma is sm90-only), 16-bit tensors of one dtype, head dim 64/80/96/128,
    descriptor-legal strides for q, k, v, out and grad_out (TMA: unit inner stride, 16-byte aligned base and
    strides), Hq a multiple of Hkv."""
    return (HAS_GLUON and q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9
            and q.dtype in (torch.float16, torch.bfloat16)
            and all(t.dtype == q.dtype for t in (k, v, out, grad_out))
            and q.dim() == 4 and k.shape == v.shape and out.shape == q.shape and grad_out.shape == q.shape
            and q.shape[0] == k.shape[0] and q.shape[-1] == k.shape[-1] and q.shape[-1] in SM90_BWD_HEAD_DIMS
            and k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0
            and all(_descriptor_legal(t) for t in (q, k, v, out, grad_out)))


def flash_attn_backward_sm90(grad_out, q, k, v, out, lse, *, causal: bool, scale: float,
                             config: Sm90BwdConfig | None = None, key_padding_mask: torch.Tensor | None = None,
                             segment_ids: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) for a forward that returned `out` and `lse` (float32 [B, Hq, Sq], natural log of the scaled
    scores' sum-exp, -inf for rows that saw no key). q, out, grad_out: [B, Hq, Sq, D]; k, v: [B, Hkv, Sk, D];
    dq, dk, dv come in the layouts of q, k, v; dk/dv are summed over each K/V head's group of query heads.
    key_padding_mask: bool [B, Sk], True = attend, as the forward had it; segment_ids: int [B, S] (Sq == Sk),
    packed sequences, a query sees the keys of its own segment only (both: warp-specialised configs only)."""
    batch, heads_q, seq_q, head_dim = q.shape
    heads_k, seq_k = k.shape[1], k.shape[2]
    config = config or default_config(head_dim)
    width = KERNEL_HEAD_DIM[head_dim]
    if config.shared_bytes(head_dim, q.element_size()) > SHARED_MEMORY_LIMIT - 1024:
        raise ValueError(f"{config.label()} needs more shared memory than a block has at head dim {head_dim}")
    dq, dk, dv = _empty_as(q), _empty_as(k), _empty_as(v)
    if seq_q == 0 or seq_k == 0:  # no query: no key gets a gradient; no key: no query does
        for t in (dq, dk, dv):
            t.zero_()
        return dq, dk, dv
    block_m = config.block_m
    padded_q = cdiv(seq_q, block_m) * block_m
    rows_all = batch * heads_q * padded_q
    delta = torch.empty(rows_all, device=q.device, dtype=torch.float32)
    lse2 = torch.empty(rows_all, device=q.device, dtype=torch.float32)
    dq_acc = torch.empty((rows_all, width), device=q.device, dtype=torch.float32)
    lse = lse.contiguous()
    prep_rows = min(block_m, 64)  # divides padded_q
    _launch_prep((padded_q // prep_rows, batch * heads_q),
        out, grad_out, lse, delta, lse2, dq_acc, out.stride(0), out.stride(1), out.stride(2), grad_out.stride(0),
        grad_out.stride(1), grad_out.stride(2), heads_q, seq_q, padded_q, head_dim,
        BLOCK_M=prep_rows, BLOCK_D=triton.next_power_of_2(head_dim), DQ_WIDTH=width, num_warps=4)
    num_n_blocks = cdiv(seq_k, config.block_n)
    constexprs = _constexprs(config, head_dim, causal, key_padding_mask is not None, segment_ids is not None)
    masks = ()  # the plain kernel has no mask arguments
    if config.warp_specialize:  # a mask never read without its HAS_ flag is a stand-in pointer with strides 0
        kpm = dq_acc if key_padding_mask is None else key_padding_mask.view(torch.uint8)
        seg = dq_acc if segment_ids is None else segment_planes(segment_ids)
        masks = (kpm, *(kpm.stride() if key_padding_mask is not None else (0, 0)),
                 seg, *((seg.stride(1), seg.stride(0)) if segment_ids is not None else (0, 0)))
    kernel = _attn_bwd_sm90 if config.warp_specialize else _attn_bwd_sm90_plain
    num_tiles = num_n_blocks * batch * heads_k
    l2_pairs = _l2_pairs(batch * heads_k, heads_q // heads_k, seq_q, width, q.element_size())
    tiles = (num_tiles, batch * heads_k, l2_pairs) if config.warp_specialize else ()  # plain: one program a tile
    grid = min(num_tiles, sm_count(q.device)) if config.persistent else num_tiles
    compiled = kernel[(grid, )](
        _descriptor(q, block_m, width), _descriptor(k, config.block_n, width), _descriptor(v, config.block_n, width),
        _descriptor(grad_out, block_m, width), _row_descriptor(lse2, block_m), _row_descriptor(delta, block_m),
        _dq_descriptor(dq_acc, *config.dq_share(head_dim)), dq_acc, dk, dv,
        # The dynamic schedule's self-resetting tile counter; other launches never read it and get a stand-in.
        *((_tile_counter(q.device) if config.dynamic else dq_acc, ) if config.warp_specialize else ()),
        scale * LOG2E.value, scale, seq_q, seq_k, heads_q, heads_k, heads_q // heads_k, padded_q, num_n_blocks,
        *tiles, head_dim,
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), *masks,
        **constexprs, num_warps=4 if config.warp_specialize else 8)
    masked = tuple(name for name, t in (("key_padding_mask", key_padding_mask), ("segment_ids", segment_ids))
                   if t is not None)
    COMPILED[(config, head_dim, causal, q.dtype) + ((masked, ) if masked else ())] = compiled
    _launch_convert((padded_q // prep_rows, batch * heads_q),
        dq_acc, dq, dq.stride(0), dq.stride(1), dq.stride(2), heads_q, seq_q, padded_q, head_dim, scale,
        BLOCK_M=prep_rows, DQ_WIDTH=width, num_warps=4)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------------
# Compiling without a GPU, for tests and inspection (Triton's bundled ptxas).
# ---------------------------------------------------------------------------------------------------------------
def compile_sm90(config: Sm90BwdConfig, head_dim: int, *, causal: bool, dtype: torch.dtype = torch.bfloat16,
                 key_padding_mask: bool = False, segment_ids: bool = False):
    """The main kernel compiled for an sm90 target as a launch with `config` would compile it."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    width = KERNEL_HEAD_DIM[head_dim]
    block_m = config.block_m

    def desc4(rows):
        return mangle_type(_descriptor(torch.empty(1, 1, rows, head_dim, dtype=dtype), rows, width))

    rows_t = torch.empty(block_m * 4, dtype=torch.float32)
    constexprs = _constexprs(config, head_dim, causal, key_padding_mask, segment_ids)
    elem = {torch.bfloat16: "*bf16", torch.float16: "*fp16"}[dtype]
    runtime = dict(desc_q=desc4(block_m), desc_k=desc4(config.block_n), desc_v=desc4(config.block_n),
                   desc_do=desc4(block_m), dk_ptr=elem, dv_ptr=elem,
                   desc_lse=mangle_type(_row_descriptor(rows_t, block_m)),
                   desc_delta=mangle_type(_row_descriptor(rows_t, block_m)),
                   desc_dq=mangle_type(_dq_descriptor(torch.empty(block_m, width, dtype=torch.float32),
                                                       *config.dq_share(head_dim))),
                   dq_acc_ptr="*fp32", counter_ptr="*i32" if config.dynamic else "*fp32",  # (else a stand-in)
                   kpm_ptr="*u8", seg_ptr="*i32", qk_scale="fp32", sm_scale="fp32")
    kernel = _attn_bwd_sm90 if config.warp_specialize else _attn_bwd_sm90_plain
    names = kernel.arg_names
    signature = {n: "constexpr" if n in constexprs else runtime.get(n, "i32") for n in names}
    source = GluonASTSource(kernel, signature, constexprs={(names.index(n), ): v for n, v in constexprs.items()},
                            attrs={(names.index(n), ): [["tt.divisibility", 16]] for n in names if n.endswith("_ptr")})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=4 if config.warp_specialize else 8))
