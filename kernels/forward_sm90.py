"""Hopper (sm90) forward in Triton's Gluon layer: a warp-specialised flash attention of the FlashAttention-3 kind.

It serves the forward on H100/H200 class GPUs: 16-bit q/k/v with descriptor-legal strides (the [B, S, H, D]
projections transformers hands over, viewed as [B, H, S, D]), head dim 64, 80, 96, 128 or 256 (80 and 96 run
the 128-wide kernel: TMA zero-fills the missing columns on load and clips them on store), GQA by index,
bottom-right causal, ragged lengths, optional log-sum-exp, and the masks transformers hands over: a key-padding
mask, `seqused_k` (a static cache's filled length per batch) and packed `segment_ids`; and tanh logit
softcapping (`softcap`, a compile-time value: Gemma 2's 50) and causal sliding windows (`window` (left, 0): the
key blocks before a tile's band are neither loaded nor computed, those on its edges masked); and sink logits
(`sinks`, one per query head, folded into each row's sum in the epilogue). No dropout, non-causal windows or key
splits: those stay with forward.py. Entry points: `sm90_eligible` and
`flash_attn_forward_sm90`.

One program owns BLOCK_M = 64 * num_consumers query rows of one (batch, head) and walks that head's keys:

  * a producer warp issues TMA loads: each consumer's 64-row Q tile once per tile, then K and V blocks into a
    ring of NUM_STAGES shared-memory buffers, K and V with separate ready/empty mbarriers so S = Q K^T can
    start before V lands and a K buffer frees as soon as its S is done;
  * 2 or 3 consumer warpgroups (4 warps each, 64 query rows each) share that K/V stream. Each runs
    S = Q K^T as an async wgmma from shared memory, the online softmax in registers (exp2, running max/sum),
    and O += P V with P kept in registers as the wgmma A operand and V read from shared memory. Three
    consumers suit head dim 64, where one warpgroup's softmax outlasts the other's matmuls.
  * OVERLAP: a consumer issues S(j) and PV(j-1) back to back and runs softmax(j) while PV(j-1) is on the
    tensor cores (FA3's intra-warpgroup pipelining). Left alone, ptxas schedules the wait for PV(j-1) right
    after the wait for S(j), above the softmax (the SASS shows it), so the softmax ran after PV(j-1);
    pin_pv_wait puts the wait for the next V block between the softmax and the PV wait, and ptxas does not
    schedule that wait across the spin loop. The blocks that need no causal/ragged mask run in a loop of
    their own. PINGPONG (with OVERLAP): an mbarrier token passed round the consumers orders their wgmma
    issues, so one warpgroup's softmax runs while another's matmuls do (FA3's inter-warpgroup schedule).
  * Register reallocation (setmaxnreg through gl.warp_specialize's worker register counts): the producer
    drops to PRODUCER_REGS, the consumers rise to about CONSUMER_REGS. With 2 consumers the default
    partition is consumer 0; with 3 it is the producer (its 4 warps wait, one issues), so that all three
    consumers are workers with the same budget.
  * Tiles: with grid = number of tiles each program runs one, tiles head-major (a head's tiles run together,
    so its K/V blocks come from L2), a causal head's query blocks longest first. Persistent (grid = number
    of SMs): each program walks a sequence of tiles, the producer running ahead into the next tile's keys
    while the consumers finish the last one; causal tiles then go in L2 sections (FA3's order: the heads
    whose K/V fit in 32 MB together, their query blocks longest first across those heads) so the long tiles
    start first everywhere. Static persistence strides over that order; dynamic persistence hands the next
    tile to whichever program asks first (an atomic counter the producer bumps and passes to its consumers
    through shared memory; the launch's last claim resets it for the next launch).

The epilogue is one of three: "q_tile" writes O through the consumer's Q buffer by a TMA store (the next Q load
waits for that store); "o_tile" writes it through a buffer of its own by a TMA store, so the Q buffer frees as
soon as the tile's last S is done and the producer can load the next tile's Q under the last PV and the
epilogue; "direct" stores O from registers with masked global stores (no buffer; Q frees as early). TMA loads
zero-fill rows past Sq/Sk and columns past the head dim, TMA stores clip them, key columns past Sk are masked.
"""

import math
from dataclasses import dataclass

import torch

from .forward_tma import _descriptor_legal
from .gluon_hopper import (HAS_GLUON, SHARED_MEMORY_LIMIT, fence_async_shared, gl, gluon, mbarrier, tma,
                           warpgroup_mma, warpgroup_mma_wait)
from .gluon_hopper import descriptor as _descriptor
from .gluon_hopper import sm_count
from .gluon_hopper import tma_load as _tma_load
from .gluon_hopper import tma_store as _tma_store
from .online_softmax import LOG2E, tanh

CONSUMER_ROWS = 64  # query rows per consumer warpgroup: one m64 wgmma row block
NUM_CONSUMERS = 2  # consumer warpgroups per program unless a config says otherwise
SM90_HEAD_DIMS = (64, 80, 96, 128, 256)
# The kernel width that serves a head dim: 80 and 96 run the 128-wide kernel over descriptors of the true width.
KERNEL_HEAD_DIM = {64: 64, 80: 128, 96: 128, 128: 128, 256: 256}
L2_KV_BYTES = 32 << 20  # K/V bytes one causal L2 section keeps resident (H100/H200 have 50 MB of L2)
EPILOGUES = ("q_tile", "o_tile", "direct")


@dataclass(frozen=True)
class Sm90Config:
    block_n: int  # keys per step
    num_stages: int  # K (and V) buffers in the shared-memory ring
    overlap: bool = True  # softmax(j) under PV(j-1)
    pingpong: bool = False  # consumers take turns issuing their wgmmas (needs overlap)
    persistent: bool = False  # grid = number of SMs, each program walks a sequence of tiles
    consumer_regs: int = 240  # per thread, for the consumer warpgroups that run as workers
    producer_regs: int = 24  # per thread, for the producer warp (and its warpgroup's padding)
    num_consumers: int = NUM_CONSUMERS  # consumer warpgroups: 2 or 3 (BLOCK_M = 128 or 192)
    dynamic: bool = False  # persistent tiles handed out by an atomic counter (needs persistent)
    epilogue: str = "q_tile"  # how O leaves: see EPILOGUES and the module docstring
    pin_pv_wait: bool = True  # (overlap) keep ptxas from hoisting the PV(j-1) wait above softmax(j)

    @property
    def block_m(self) -> int:
        return CONSUMER_ROWS * self.num_consumers

    def shared_bytes(self, head_dim: int, element_size: int = 2) -> int:
        """Q tiles + K and V rings (+ the O tiles of the "o_tile" epilogue); the barriers add a few dozen bytes."""
        head_dim = KERNEL_HEAD_DIM.get(head_dim, head_dim)
        rows = self.block_m * (2 if self.epilogue == "o_tile" else 1) + 2 * self.num_stages * self.block_n
        return rows * head_dim * element_size

    def label(self) -> str:
        flags = "".join(f for f, on in (("+ov", self.overlap), ("+pp", self.pingpong), ("+persist", self.persistent),
                                        ("+dyn", self.dynamic), ("+ob", self.epilogue == "o_tile"),
                                        ("+ds", self.epilogue == "direct"),
                                        ("+nopin", self.overlap and not self.pin_pv_wait)) if on)
        return f"m{self.block_m}n{self.block_n}s{self.num_stages}{flags}"


# Candidates per head dim, the first is the default. Registers: 65536 per SM. With 2 consumers the kernel starts
# at 168 per thread for its 12 warps (4 + 4 + the producer warp padded to a warpgroup), the producer's
# warpgroup drops to producer_regs and the consumers rise to 240; at head dim 256 a 24-register producer spills
# one value, so it keeps 32. With 3 consumers (16 warps, 128 each at launch) the consumers get 160 and the
# producer's warpgroup the remaining 32. On an H200 (bf16, 8 x 32 heads) the +ov+pp+nopin schedule (the only
# one before pin_pv_wait existed) reached 498-613 TFLOPS at d128 non-causal N = 1K..16K, 559-627 with static
# persistence, and +ov 372-598 causal; static persistence over head-major tiles lost up to 22% on causal
# shapes, which the L2-section order and the dynamic scheduler address. At head dim 64 the softmax is the larger
# share of a block's work, and three consumers without overlap (each warpgroup's softmax hides under the other
# two's wgmmas) beat every two-consumer schedule: 1.03x-1.08x cuDNN non-causal from N = 2K (BENCHMARKS 1).
_O, _DS = dict(persistent=True, dynamic=True, epilogue="o_tile"), dict(persistent=True, dynamic=True, epilogue="direct")
_THREE = dict(num_consumers=3, consumer_regs=160)
SM90_CONFIGS: dict[int, list[Sm90Config]] = {
    64: [Sm90Config(128, 3, overlap=False, **_O, **_THREE),
         Sm90Config(128, 2, overlap=False, **_O, **_THREE),
         Sm90Config(128, 4, overlap=False, **_O, **_THREE),
         Sm90Config(128, 3, pingpong=True, **_O, **_THREE),
         Sm90Config(128, 3, pingpong=True),
         Sm90Config(128, 4, overlap=False, **_O)],
    128: [Sm90Config(128, 2, pingpong=True),
          Sm90Config(128, 2, pingpong=True, pin_pv_wait=False),
          Sm90Config(128, 2, pingpong=True, persistent=True, epilogue="o_tile"),
          Sm90Config(128, 2, pingpong=True, **_O),
          Sm90Config(128, 2, **_O),
          Sm90Config(128, 3, pingpong=True, persistent=True, dynamic=True)],
    256: [Sm90Config(64, 2, pingpong=True, producer_regs=32),
          Sm90Config(64, 2, pingpong=True, pin_pv_wait=False, producer_regs=32),
          Sm90Config(64, 2, producer_regs=32),
          Sm90Config(64, 2, pingpong=True, producer_regs=32, **_DS),
          Sm90Config(64, 2, producer_regs=32, **_DS),
          Sm90Config(64, 2, pingpong=True, producer_regs=32, persistent=True, dynamic=True)],
}
SM90_CONFIGS[80] = SM90_CONFIGS[96] = SM90_CONFIGS[128]


def default_config(head_dim: int) -> Sm90Config:
    return SM90_CONFIGS[head_dim][0]


# ---------------------------------------------------------------------------------------------------------------
# Step 1: tiles. A tile is (batch, query head, query block); producer and consumers walk the same tile sequence.
# ---------------------------------------------------------------------------------------------------------------
@gluon.jit
def section_order(tile, blocks, section_heads, heads):
    """(head, rank) of a tile in L2 sections: section_heads heads at a time (of `heads`; the last section may be
    short), each section's tiles ordered by block rank first, then head, so the heads of a section that L2 holds
    take their longest blocks (rank 0) first, together."""
    per_section = section_heads * blocks
    section = tile // per_section
    first = section * section_heads
    in_section = gl.minimum(section_heads, heads - first)
    within = tile - section * per_section
    rank = within // in_section
    return first + within - rank * in_section, rank


@gluon.jit
def _tile_coords(tile, num_m_blocks, heads_q, batch_heads, l2_heads, CAUSAL: gl.constexpr,
                 SECTIONS: gl.constexpr):
    if SECTIONS:  # l2_heads (batch, head) pairs at a time, their query blocks longest first across them
        bh, m_rank = section_order(tile, num_m_blocks, l2_heads, batch_heads)
        m_block = num_m_blocks - 1 - m_rank
    else:  # head-major
        bh = tile // num_m_blocks
        m_block = tile % num_m_blocks
        if CAUSAL:  # the longest rows of a head first
            m_block = num_m_blocks - 1 - m_block
    return bh // heads_q, bh % heads_q, m_block


@gluon.jit
def _keys_of(b, seq_k, seqused_ptr, HAS_SEQUSED: gl.constexpr):
    """Keys batch b has: Sk, or seqused_k[b] (clamped to [0, Sk]) for a static cache."""
    if HAS_SEQUSED:
        seq_k = gl.maximum(gl.minimum(gl.load(seqused_ptr + b), seq_k), 0)
    return seq_k


@gluon.jit
def _num_key_blocks(m_block, seq_q, seq_k, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """Key blocks the program's BLOCK_M rows see (0 for causal rows above every key when Sq > Sk)."""
    hi = seq_k
    if CAUSAL:  # bottom-right: query i sees keys j <= i + seq_k - seq_q
        hi = gl.maximum(gl.minimum(seq_k, (m_block + 1) * BLOCK_M + seq_k - seq_q), 0)
    return (hi + BLOCK_N - 1) // BLOCK_N


@gluon.jit
def _first_key_block(m_block, seq_q, seq_k, n_blocks, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                     WINDOW_LEFT: gl.constexpr):
    """With a causal window (query i sees keys i + Sk - Sq - WINDOW_LEFT to i + Sk - Sq): the first key block the
    tile's rows see, the block of its first row's first key (at most n_blocks). Producer and consumers agree on it."""
    return gl.minimum(gl.maximum(m_block * BLOCK_M + seq_k - seq_q - WINDOW_LEFT, 0) // BLOCK_N, n_blocks)


@gluon.jit
def _put_tile(slot, tile, WARPS: gl.constexpr):
    """The producer (WARPS warps) leaves a tile index in shared memory for a consumer."""
    slot.store(gl.full([1], tile, gl.int32, layout=gl.BlockedLayout([1], [32], [WARPS], [0])))


@gluon.jit
def _get_tile(slot):
    """A consumer warpgroup reads the tile index the producer left."""
    return gl.max(slot.load(gl.BlockedLayout([1], [32], [4], [0])), axis=0)


# ---------------------------------------------------------------------------------------------------------------
# Step 2: the producer warp. It waits for a buffer to be empty, arms its ready barrier with the byte count and
# issues the TMA copy; fresh barriers pass a wait on phase 1, so the first round of waits falls through.
# ---------------------------------------------------------------------------------------------------------------
@gluon.jit
def _load_q_tiles(desc_q, q_smem, q_ready, q_empty, tile_slots, tile, b, h, row0, tile_count,
                  NUM_CONSUMERS: gl.constexpr, DYNAMIC: gl.constexpr, WARPS: gl.constexpr):
    ROWS: gl.constexpr = desc_q.block_type.shape[2]
    for w in gl.static_range(NUM_CONSUMERS):
        mbarrier.wait(q_empty.index(w), (tile_count & 1) ^ 1)  # consumer w is done with its last Q tile
        if DYNAMIC:  # published by the ready barrier's arrive (release), read after the consumer's wait
            _put_tile(tile_slots.index(w), tile, WARPS)
        mbarrier.expect(q_ready.index(w), desc_q.block_type.nbytes)
        _tma_load(desc_q, [b, h, row0 + w * ROWS, 0], q_ready.index(w), q_smem.index(w))


@gluon.jit
def _load_kv(desc, smem, ready, empty, b, kv_h, j, count, NUM_STAGES: gl.constexpr):
    BLOCK_N: gl.constexpr = desc.block_type.shape[2]
    stage = count % NUM_STAGES
    mbarrier.wait(empty.index(stage), ((count // NUM_STAGES) & 1) ^ 1)
    mbarrier.expect(ready.index(stage), desc.block_type.nbytes)
    _tma_load(desc, [b, kv_h, j * BLOCK_N, 0], ready.index(stage), smem.index(stage))


@gluon.jit
def _next_tile(tile, counter_ptr, num_tiles, DYNAMIC: gl.constexpr):
    if DYNAMIC:
        # Claims hand out 0, 1, 2, ...; a program's first tile is its id, so claim c means tile c + grid. Each
        # program claims until it gets no tile, which makes exactly num_tiles claims per launch: the one that
        # gets num_tiles - 1 is the launch's last and resets the counter for the next launch.
        claimed = gl.atomic_add(counter_ptr, 1)
        gl.atomic_xchg(counter_ptr, 0, mask=claimed == num_tiles - 1)
        nxt = claimed + gl.num_programs(0)
    else:
        nxt = tile + gl.num_programs(0)
    return nxt


@gluon.jit
def _produce_tile(desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready,
                  v_empty, tile_slots, counter_ptr, seqused_ptr, tile, kv_count, tile_count, seq_q, seq_k, heads_q,
                  group_size, num_m_blocks, num_tiles, batch_heads, l2_heads,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
                  NUM_CONSUMERS: gl.constexpr, CAUSAL: gl.constexpr, SECTIONS: gl.constexpr,
                  DYNAMIC: gl.constexpr, HAS_SEQUSED: gl.constexpr, WINDOW_LEFT: gl.constexpr,
                  WARPS: gl.constexpr):
    b, h, m_block = _tile_coords(tile, num_m_blocks, heads_q, batch_heads, l2_heads, CAUSAL, SECTIONS)
    kv_h = h // group_size  # GQA: consecutive query heads share a K/V head
    keys = _keys_of(b, seq_k, seqused_ptr, HAS_SEQUSED)
    n_blocks = _num_key_blocks(m_block, seq_q, keys, BLOCK_M, BLOCK_N, CAUSAL)
    first = 0  # the tile's first key block: 0, or with a window the block of its first row's first key
    if WINDOW_LEFT >= 0:
        first = _first_key_block(m_block, seq_q, keys, n_blocks, BLOCK_M, BLOCK_N, WINDOW_LEFT)
    # K(first) before the Q tiles: a persistent program's next K need not wait for the consumers' last epilogue.
    if n_blocks > first:
        _load_kv(desc_k, k_smem, k_ready, k_empty, b, kv_h, first, kv_count, NUM_STAGES)
    _load_q_tiles(desc_q, q_smem, q_ready, q_empty, tile_slots, tile, b, h, m_block * BLOCK_M, tile_count,
                  NUM_CONSUMERS, DYNAMIC, WARPS)
    if n_blocks > first:
        _load_kv(desc_v, v_smem, v_ready, v_empty, b, kv_h, first, kv_count, NUM_STAGES)
    # The next tile is claimed here, its latency hidden behind the ring's waits that follow.
    next_tile = _next_tile(tile, counter_ptr, num_tiles, DYNAMIC)
    for j in range(first + 1, n_blocks):
        _load_kv(desc_k, k_smem, k_ready, k_empty, b, kv_h, j, kv_count + j - first, NUM_STAGES)
        _load_kv(desc_v, v_smem, v_ready, v_empty, b, kv_h, j, kv_count + j - first, NUM_STAGES)
    return kv_count + n_blocks - first, next_tile


@gluon.jit
def _producer(desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
              tile_slots, counter_ptr, seqused_ptr, seq_q, seq_k, heads_q, group_size, num_m_blocks, num_tiles,
              batch_heads, l2_heads,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
              NUM_CONSUMERS: gl.constexpr, CAUSAL: gl.constexpr, SECTIONS: gl.constexpr, DYNAMIC: gl.constexpr,
              HAS_SEQUSED: gl.constexpr, WINDOW_LEFT: gl.constexpr, WARPS: gl.constexpr):
    kv_count = 0  # K/V blocks loaded so far: ring slot and phase, continuing across tiles
    tile_count = 0
    tile = gl.program_id(0)
    while tile < num_tiles:
        kv_count, tile = _produce_tile(desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready,
                                       k_empty, v_ready, v_empty, tile_slots, counter_ptr, seqused_ptr, tile,
                                       kv_count, tile_count, seq_q, seq_k, heads_q, group_size, num_m_blocks,
                                       num_tiles, batch_heads, l2_heads, BLOCK_M, BLOCK_N, NUM_STAGES,
                                       NUM_CONSUMERS, CAUSAL, SECTIONS, DYNAMIC, HAS_SEQUSED, WINDOW_LEFT,
                                       WARPS)
        tile_count += 1
    if DYNAMIC:  # no tile left: a past-the-end index tells each consumer to stop
        for w in gl.static_range(NUM_CONSUMERS):
            mbarrier.wait(q_empty.index(w), (tile_count & 1) ^ 1)
            _put_tile(tile_slots.index(w), num_tiles, WARPS)
            mbarrier.arrive(q_ready.index(w))


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
def _load_key_masks(kpm_base, seg_base, start_n, seq_k, BLOCK_N: gl.constexpr, s_layout: gl.constexpr,
                    MASKED: gl.constexpr, HAS_KPM: gl.constexpr, HAS_SEG: gl.constexpr):
    """The block's key-padding flags and key segment ids. The unmasked blocks issue these loads before the S wait,
    so their latency hides, and without a bound check (so in pairs: a thread's columns come two by two); the
    masked blocks load them after the wait, bounded by Sk (loaded early, their 32 values per thread spill)."""
    cols = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    keep = 0
    seg_k = 0
    if HAS_KPM:
        if MASKED:
            keep = gl.load(kpm_base + cols, mask=cols < seq_k, other=0)
        else:
            keep = gl.load(kpm_base + cols)
    if HAS_SEG:
        if MASKED:
            seg_k = gl.load(seg_base + cols, mask=cols < seq_k, other=-1)
        else:
            seg_k = gl.load(seg_base + cols)
    return keep, seg_k


@gluon.jit
def _softmax_step(s, m_i, l_i, qk_scale, start_n, row0, seq_k, causal_offset, masked, keep, seg_k, seg_q,
                  ROWS: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, HAS_KPM: gl.constexpr,
                  HAS_SEG: gl.constexpr, SOFTCAP: gl.constexpr, WINDOW_LEFT: gl.constexpr, s_layout: gl.constexpr):
    """Online softmax of one block in base 2. m_i is the running max of raw scores; scaling is folded into one
    FFMA per score. Returns p (fp32), the rescale factor alpha for O and l, and the new m_i, l_i. SOFTCAP (a
    constexpr, 0.0: none): the scores become SOFTCAP * tanh(s * scale / SOFTCAP), in base 2 (qk_scale is then
    scale / SOFTCAP, applied inside the tanh), and m_i their running max."""
    if SOFTCAP != 0.0:
        s = tanh(s * qk_scale) * (SOFTCAP * 1.4426950408889634)
        qk_scale = qk_scale * 0.0 + 1.0  # the capped scores are scaled already
    if masked:  # the diagonal block(s) and the ragged tail: keys past Sk (TMA reads zeros there) and future keys
        # One bound per row, relative to the block: key column c is visible iff c < limit.
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        if CAUSAL:
            rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
            limit = gl.minimum(rows + (row0 + causal_offset + 1 - start_n), seq_k - start_n)
            visible = gl.expand_dims(cols, 0) < gl.expand_dims(limit, 1)
            if WINDOW_LEFT >= 0:  # and not left of the row's window
                lowest = rows + (row0 + causal_offset - WINDOW_LEFT - start_n)
                visible = visible & (gl.expand_dims(cols, 0) >= gl.expand_dims(lowest, 1))
        else:
            visible = gl.expand_dims(cols < seq_k - start_n, 0)
        s = gl.where(visible, s, float("-inf"))
    if HAS_KPM:  # any block may hold padding: an additive 0 / -inf per key (no [rows, keys] predicate)
        s = s + gl.expand_dims(gl.where(keep != 0, 0.0, float("-inf")), 0)
    if HAS_SEG:  # a query sees the keys of its own packed sequence
        s = gl.where(gl.expand_dims(seg_q, 1) == gl.expand_dims(seg_k, 0), s, float("-inf"))
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
                    n_unmasked, first, first_full, qk_scale, row0, seq_k, causal_offset, kpm_base, seg_base, seg_q,
                    BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                    HAS_KPM: gl.constexpr, HAS_SEG: gl.constexpr, SOFTCAP: gl.constexpr, WINDOW_LEFT: gl.constexpr,
                    s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr):
    """S(j), softmax(j), PV(j) in turn; the other consumer warpgroups fill the tensor cores meanwhile."""
    ROWS: gl.constexpr = q_mma.shape[0]
    for j in range(first, n_blocks):
        stage = (kv_count + j - first) % NUM_STAGES
        phase = ((kv_count + j - first) // NUM_STAGES) & 1
        mbarrier.wait(k_ready.index(stage), phase)
        s = _scores(q_mma, k_smem.index(stage), ROWS, BLOCK_N, HEAD_DIM, s_layout)
        keep, seg_k = _load_key_masks(kpm_base, seg_base, j * BLOCK_N, seq_k, BLOCK_N, s_layout, True, HAS_KPM,
                                      HAS_SEG)
        s = warpgroup_mma_wait(0, deps=(s,))
        mbarrier.arrive(k_empty.index(stage))
        masked = j >= n_unmasked
        if WINDOW_LEFT >= 0:  # the blocks left of some row's window too
            masked = masked | (j < first_full)
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, qk_scale, j * BLOCK_N, row0, seq_k, causal_offset,
                                           masked, keep, seg_k, seg_q, ROWS, BLOCK_N, CAUSAL, HAS_KPM,
                                           HAS_SEG, SOFTCAP, WINDOW_LEFT, s_layout)
        acc = _rescale(acc, alpha, gl.SliceLayout(1, o_layout))
        p_op = gl.convert_layout(p.to(k_smem.dtype), p_layout)
        mbarrier.wait(v_ready.index(stage), phase)
        v = v_smem.index(stage).reshape([BLOCK_N, HEAD_DIM])
        acc = warpgroup_mma(p_op, v, acc, is_async=True)
        acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
        mbarrier.arrive(v_empty.index(stage))
    return acc, m_i, l_i


@gluon.jit
def _overlapped_step(q_mma, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turns, acc, p_op, m_i, l_i, count,
                     turn_count, start_n, qk_scale, row0, seq_k, causal_offset, kpm_base, seg_base,
                     seg_q, WG: gl.constexpr, NUM_CONSUMERS: gl.constexpr, BLOCK_N: gl.constexpr,
                     HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                     PINGPONG: gl.constexpr, MASKED: gl.constexpr, HAS_KPM: gl.constexpr, HAS_SEG: gl.constexpr,
                     SOFTCAP: gl.constexpr, WINDOW_LEFT: gl.constexpr, PIN: gl.constexpr, s_layout: gl.constexpr,
                     o_layout: gl.constexpr,
                     p_layout: gl.constexpr):
    """One block of the overlapped schedule: `count` is the block's place in the K/V ring, P(j-1) comes in as
    p_op and P(j) goes out."""
    ROWS: gl.constexpr = q_mma.shape[0]
    prev_stage = (count - 1) % NUM_STAGES
    prev_phase = ((count - 1) // NUM_STAGES) & 1
    stage = count % NUM_STAGES
    phase = (count // NUM_STAGES) & 1
    mbarrier.wait(k_ready.index(stage), phase)
    if not PIN:
        mbarrier.wait(v_ready.index(prev_stage), prev_phase)
    turn_count = _take_turn(turns, turn_count, WG, PINGPONG)
    s = _scores(q_mma, k_smem.index(stage), ROWS, BLOCK_N, HEAD_DIM, s_layout)
    v = v_smem.index(prev_stage).reshape([BLOCK_N, HEAD_DIM])
    acc = warpgroup_mma(p_op, v, acc, is_async=True)
    _pass_turn(turns, WG, NUM_CONSUMERS, PINGPONG)
    if not MASKED:  # loaded under the S wait; the masked blocks load after it, which keeps fewer values live
        keep, seg_k = _load_key_masks(kpm_base, seg_base, start_n, seq_k, BLOCK_N, s_layout, False, HAS_KPM,
                                      HAS_SEG)
    s = warpgroup_mma_wait(1, deps=(s,))  # S(j) done; PV(j-1) may still run
    mbarrier.arrive(k_empty.index(stage))
    if MASKED:
        keep, seg_k = _load_key_masks(kpm_base, seg_base, start_n, seq_k, BLOCK_N, s_layout, True, HAS_KPM,
                                      HAS_SEG)
    p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, qk_scale, start_n, row0, seq_k, causal_offset, MASKED, keep,
                                       seg_k, seg_q, s.shape[0], BLOCK_N, CAUSAL, HAS_KPM, HAS_SEG, SOFTCAP,
                                       WINDOW_LEFT, s_layout)
    if PIN:
        # The wait for V(j) (PV(j) runs in the next step) sits between the softmax and the wait for PV(j-1):
        # its spin loop is a block boundary that ptxas does not schedule the PV wait across. Without it ptxas
        # hoists that wait above the softmax (its latency model takes PV(j-1) to be nearly done), and the
        # softmax then runs after PV(j-1), not under it.
        mbarrier.wait(v_ready.index(stage), phase)
    acc, p_op, p = warpgroup_mma_wait(0, deps=(acc, p_op, p))
    mbarrier.arrive(v_empty.index(prev_stage))
    p_next = gl.convert_layout(p.to(k_smem.dtype), p_layout)
    acc = _rescale(acc, alpha, gl.SliceLayout(1, o_layout))
    return acc, p_next, m_i, l_i, turn_count


@gluon.jit
def _key_loop_overlapped(q_mma, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turns, acc, m_i, l_i, kv_count,
                         turn_count, n_blocks, n_unmasked, first, first_full, qk_scale, row0, seq_k, causal_offset,
                         kpm_base, seg_base, seg_q,
                         WG: gl.constexpr, NUM_CONSUMERS: gl.constexpr, BLOCK_N: gl.constexpr,
                         HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                         PINGPONG: gl.constexpr, HAS_KPM: gl.constexpr, HAS_SEG: gl.constexpr,
                         SOFTCAP: gl.constexpr, WINDOW_LEFT: gl.constexpr, PIN: gl.constexpr, s_layout: gl.constexpr,
                         o_layout: gl.constexpr, p_layout: gl.constexpr):
    """Needs n_blocks > first (blocks first, ..., n_blocks - 1 run; a window's blocks before first_full are masked
    too). Iteration j issues S(j) and PV(j-1) together, waits for S(j) only, runs softmax(j) while PV(j-1) runs,
    then waits for PV(j-1) and rescales O. P(j) is carried into the next iteration. The
    blocks that need no causal/ragged mask run in a loop of their own, which holds no mask code (and lets the
    scalars only the mask needs sit outside the hot loop)."""
    ROWS: gl.constexpr = q_mma.shape[0]
    stage = kv_count % NUM_STAGES
    phase = (kv_count // NUM_STAGES) & 1
    mbarrier.wait(k_ready.index(stage), phase)
    turn_count = _take_turn(turns, turn_count, WG, PINGPONG)
    s = _scores(q_mma, k_smem.index(stage), ROWS, BLOCK_N, HEAD_DIM, s_layout)
    _pass_turn(turns, WG, NUM_CONSUMERS, PINGPONG)
    keep, seg_k = _load_key_masks(kpm_base, seg_base, first * BLOCK_N, seq_k, BLOCK_N, s_layout, True, HAS_KPM,
                                  HAS_SEG)
    s = warpgroup_mma_wait(0, deps=(s,))
    mbarrier.arrive(k_empty.index(stage))
    masked = first >= n_unmasked
    if WINDOW_LEFT >= 0:
        masked = masked | (first < first_full)
    p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, qk_scale, first * BLOCK_N, row0, seq_k, causal_offset, masked,
                                       keep, seg_k, seg_q, ROWS, BLOCK_N, CAUSAL, HAS_KPM, HAS_SEG, SOFTCAP,
                                       WINDOW_LEFT, s_layout)
    p_op = gl.convert_layout(p.to(k_smem.dtype), p_layout)
    if PIN:  # each step waits for the V its successor uses
        mbarrier.wait(v_ready.index(stage), phase)
    unmasked_from = first + 1
    if WINDOW_LEFT >= 0:  # the blocks left of some row's window, masked
        for j in range(first + 1, gl.minimum(first_full, n_blocks)):
            acc, p_op, m_i, l_i, turn_count = _overlapped_step(
                q_mma, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turns, acc, p_op, m_i, l_i,
                kv_count + j - first, turn_count, j * BLOCK_N, qk_scale, row0, seq_k, causal_offset, kpm_base,
                seg_base, seg_q, WG, NUM_CONSUMERS, BLOCK_N, HEAD_DIM, NUM_STAGES, CAUSAL, PINGPONG, True, HAS_KPM,
                HAS_SEG, SOFTCAP, WINDOW_LEFT, PIN, s_layout, o_layout, p_layout)
        unmasked_from = gl.maximum(first_full, first + 1)
    split = gl.minimum(gl.maximum(n_unmasked, unmasked_from), n_blocks)
    for j in range(unmasked_from, split):
        acc, p_op, m_i, l_i, turn_count = _overlapped_step(
            q_mma, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turns, acc, p_op, m_i, l_i, kv_count + j - first,
            turn_count, j * BLOCK_N, qk_scale, row0, seq_k, causal_offset, kpm_base, seg_base, seg_q,
            WG, NUM_CONSUMERS, BLOCK_N, HEAD_DIM, NUM_STAGES, CAUSAL, PINGPONG, False, HAS_KPM, HAS_SEG, SOFTCAP,
            WINDOW_LEFT, PIN, s_layout, o_layout, p_layout)
    for j in range(split, n_blocks):
        acc, p_op, m_i, l_i, turn_count = _overlapped_step(
            q_mma, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turns, acc, p_op, m_i, l_i, kv_count + j - first,
            turn_count, j * BLOCK_N, qk_scale, row0, seq_k, causal_offset, kpm_base, seg_base, seg_q,
            WG, NUM_CONSUMERS, BLOCK_N, HEAD_DIM, NUM_STAGES, CAUSAL, PINGPONG, True, HAS_KPM, HAS_SEG, SOFTCAP,
            WINDOW_LEFT, PIN, s_layout, o_layout, p_layout)
    last = (kv_count + n_blocks - first - 1) % NUM_STAGES
    if not PIN:
        mbarrier.wait(v_ready.index(last), ((kv_count + n_blocks - first - 1) // NUM_STAGES) & 1)
    turn_count = _take_turn(turns, turn_count, WG, PINGPONG)
    acc = warpgroup_mma(p_op, v_smem.index(last).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
    _pass_turn(turns, WG, NUM_CONSUMERS, PINGPONG)
    acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
    mbarrier.arrive(v_empty.index(last))
    return acc, m_i, l_i, turn_count


# ---------------------------------------------------------------------------------------------------------------
# Step 5: a consumer warpgroup: its 64 rows of a tile, the epilogue, and the lse.
# ---------------------------------------------------------------------------------------------------------------
@gluon.jit
def _consume_tile(desc_o, out_ptr, lse_ptr, kpm_ptr, seqused_ptr, seg_ptr, sinks_ptr, q_smem, o_smem, k_smem, v_smem,
                  q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turns, tile, kv_count, tile_count, turn_count,
                  qk_scale, seq_q, seq_k, heads_q, num_m_blocks, batch_heads, l2_heads, stride_ob, stride_oh,
                  stride_os, head_dim, stride_kpm_b, stride_seg_b,
                  WG: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                  NUM_STAGES: gl.constexpr, NUM_CONSUMERS: gl.constexpr, CAUSAL: gl.constexpr,
                  OVERLAP: gl.constexpr, PINGPONG: gl.constexpr, WRITE_LSE: gl.constexpr, SECTIONS: gl.constexpr,
                  WAIT_Q: gl.constexpr, EPILOGUE: gl.constexpr, HAS_KPM: gl.constexpr,
                  HAS_SEQUSED: gl.constexpr, HAS_SEG: gl.constexpr, SOFTCAP: gl.constexpr, WINDOW_LEFT: gl.constexpr,
                  HAS_SINKS: gl.constexpr):
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
    b, h, m_block = _tile_coords(tile, num_m_blocks, heads_q, batch_heads, l2_heads, CAUSAL, SECTIONS)
    seq_k = _keys_of(b, seq_k, seqused_ptr, HAS_SEQUSED)
    causal_offset = seq_k - seq_q
    row0 = m_block * BLOCK_M + WG * ROWS
    n_blocks = _num_key_blocks(m_block, seq_q, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
    # Blocks before n_unmasked see only keys < Sk that every one of this warpgroup's rows may attend.
    mask_from = seq_k
    if CAUSAL:
        mask_from = gl.minimum(seq_k, row0 + causal_offset + 1)
    n_unmasked = gl.maximum(mask_from, 0) // BLOCK_N
    first = 0  # the tile's first key block (the producer's), and the first one past every row's window's start
    first_full = 0
    if WINDOW_LEFT >= 0:
        first = _first_key_block(m_block, seq_q, seq_k, n_blocks, BLOCK_M, BLOCK_N, WINDOW_LEFT)
        first_full = gl.maximum((gl.maximum(row0 + ROWS - 1 + causal_offset - WINDOW_LEFT, 0) + BLOCK_N - 1)
                                // BLOCK_N, first)
    kpm_base = kpm_ptr + b.to(gl.int64) * stride_kpm_b
    seg_base = seg_ptr + b.to(gl.int64) * stride_seg_b
    seg_q = 0
    if HAS_SEG:
        rows = row0 + gl.arange(0, ROWS, layout=s_rows)
        seg_q = gl.load(seg_base + rows, mask=rows < seq_q, other=-2)

    m_i = gl.full([ROWS], float("-inf"), gl.float32, s_rows)
    l_i = gl.zeros([ROWS], gl.float32, s_rows)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
    if WAIT_Q:
        mbarrier.wait(q_ready.index(WG), tile_count & 1)
    if OVERLAP:
        if n_blocks > first:
            acc, m_i, l_i, turn_count = _key_loop_overlapped(
                q_mma, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turns, acc, m_i, l_i, kv_count,
                turn_count, n_blocks, n_unmasked, first, first_full, qk_scale, row0, seq_k, causal_offset, kpm_base,
                seg_base, seg_q,
                WG, NUM_CONSUMERS, BLOCK_N, HEAD_DIM, NUM_STAGES, CAUSAL, PINGPONG, HAS_KPM, HAS_SEG, SOFTCAP,
                WINDOW_LEFT,
                OVERLAP == 2, s_layout, o_layout, p_layout)
    else:
        acc, m_i, l_i = _key_loop_plain(q_mma, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, acc, m_i,
                                        l_i, kv_count, n_blocks, n_unmasked, first, first_full, qk_scale, row0, seq_k,
                                        causal_offset, kpm_base, seg_base, seg_q, BLOCK_N,
                                        HEAD_DIM, NUM_STAGES, CAUSAL, HAS_KPM, HAS_SEG, SOFTCAP, WINDOW_LEFT, s_layout,
                                        o_layout, p_layout)
    if EPILOGUE != 0:  # O does not go through the Q buffer: the next tile's Q may load now
        mbarrier.arrive(q_empty.index(WG))

    # Epilogue. A row that saw no key (l = 0) returns zeros and lse = -inf.
    seen = l_i > 0.0
    if HAS_SINKS:  # the head's sink logit joins every row's sum with no value: l' = l * 2^(m - m') + 2^(sink - m')
        m_log2 = m_i * qk_scale
        if SOFTCAP != 0.0:  # softcapped scores are in base 2 already
            m_log2 = m_i
        sink = gl.load(sinks_ptr + h).to(gl.float32) * 1.4426950408889634
        m_new = gl.maximum(m_log2, sink)
        m_ref = gl.where(m_new == float("-inf"), 0.0, m_new)  # a sink of -inf and a row without keys
        alpha = gl.exp2(m_log2 - m_ref)
        l_i = l_i * alpha + gl.exp2(sink - m_ref)
        seen = l_i > 0.0  # a row without keys sees its sink: zeros out, lse = sink
        inv_l = gl.where(seen, alpha / gl.where(seen, l_i, 1.0), 0.0)
        m_i = m_ref  # base 2 from here on, as softcapped scores are
    else:
        inv_l = gl.where(seen, 1.0 / gl.where(seen, l_i, 1.0), 0.0)
    out = (acc * gl.expand_dims(gl.convert_layout(inv_l, o_rows), 1)).to(q_smem.dtype)
    if EPILOGUE == 0:  # through the Q buffer
        q_mma.store(out)
        fence_async_shared()
        _tma_store(desc_o, [b, h, row0, 0], q_tile)  # rows past Sq and columns past the head dim are clipped
    elif EPILOGUE == 1:  # through the O buffer, once the last tile's store has read it
        o_tile = o_smem.index(WG)
        tma.store_wait(0)
        o_tile.reshape([ROWS, HEAD_DIM]).store(out)
        fence_async_shared()
        _tma_store(desc_o, [b, h, row0, 0], o_tile)
    else:  # from registers
        rows = row0 + gl.arange(0, ROWS, layout=o_rows)
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        o_base = out_ptr + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
        ptrs = o_base + gl.expand_dims(rows.to(gl.int64) * stride_os, 1) + gl.expand_dims(cols, 0)
        gl.store(ptrs, out, mask=gl.expand_dims(rows < seq_q, 1) & gl.expand_dims(cols < head_dim, 0))
    if WRITE_LSE:
        rows = row0 + gl.arange(0, ROWS, layout=s_rows)
        m_log2 = m_i * qk_scale
        if SOFTCAP != 0.0 or HAS_SINKS:  # softcapped scores (and the max with a sink) are in base 2 already
            m_log2 = m_i
        m_scaled = gl.where(seen, m_log2, 0.0)
        lse = gl.where(seen, (m_scaled + gl.log2(gl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        gl.store(lse_ptr + (b * heads_q + h).to(gl.int64) * seq_q + rows, lse, mask=rows < seq_q)
    if EPILOGUE == 0:
        tma.store_wait(0)
        mbarrier.arrive(q_empty.index(WG))  # the Q buffer may take the next tile's rows
    return kv_count + n_blocks - first, turn_count


@gluon.jit
def _consumer(desc_o, out_ptr, lse_ptr, kpm_ptr, seqused_ptr, seg_ptr, sinks_ptr, q_smem, o_smem, k_smem, v_smem,
              q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turns, tile_slots, qk_scale, seq_q, seq_k, heads_q,
              num_m_blocks, num_tiles, batch_heads, l2_heads, stride_ob, stride_oh, stride_os, head_dim,
              stride_kpm_b, stride_seg_b,
              WG: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
              NUM_STAGES: gl.constexpr, NUM_CONSUMERS: gl.constexpr, CAUSAL: gl.constexpr, OVERLAP: gl.constexpr,
              PINGPONG: gl.constexpr, WRITE_LSE: gl.constexpr, SECTIONS: gl.constexpr, DYNAMIC: gl.constexpr,
              EPILOGUE: gl.constexpr, HAS_KPM: gl.constexpr, HAS_SEQUSED: gl.constexpr, HAS_SEG: gl.constexpr,
              SOFTCAP: gl.constexpr, WINDOW_LEFT: gl.constexpr, HAS_SINKS: gl.constexpr):
    kv_count = 0
    tile_count = 0
    turn_count = 0
    if DYNAMIC:  # the producer names each tile (past the end: stop) when it arms the Q tile's barrier
        mbarrier.wait(q_ready.index(WG), 0)
        tile = _get_tile(tile_slots.index(WG))
        while tile < num_tiles:
            kv_count, turn_count = _consume_tile(
                desc_o, out_ptr, lse_ptr, kpm_ptr, seqused_ptr, seg_ptr, sinks_ptr, q_smem, o_smem, k_smem, v_smem,
                q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turns, tile, kv_count, tile_count, turn_count,
                qk_scale, seq_q, seq_k, heads_q, num_m_blocks, batch_heads, l2_heads, stride_ob, stride_oh,
                stride_os, head_dim, stride_kpm_b, stride_seg_b, WG, BLOCK_M, BLOCK_N, HEAD_DIM,
                NUM_STAGES, NUM_CONSUMERS, CAUSAL, OVERLAP, PINGPONG, WRITE_LSE, SECTIONS, False, EPILOGUE,
                HAS_KPM, HAS_SEQUSED, HAS_SEG, SOFTCAP, WINDOW_LEFT, HAS_SINKS)
            tile_count += 1
            mbarrier.wait(q_ready.index(WG), tile_count & 1)
            tile = _get_tile(tile_slots.index(WG))
    else:
        for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            kv_count, turn_count = _consume_tile(
                desc_o, out_ptr, lse_ptr, kpm_ptr, seqused_ptr, seg_ptr, sinks_ptr, q_smem, o_smem, k_smem, v_smem,
                q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turns, tile, kv_count, tile_count, turn_count,
                qk_scale, seq_q, seq_k, heads_q, num_m_blocks, batch_heads, l2_heads, stride_ob, stride_oh,
                stride_os, head_dim, stride_kpm_b, stride_seg_b, WG, BLOCK_M, BLOCK_N, HEAD_DIM,
                NUM_STAGES, NUM_CONSUMERS, CAUSAL, OVERLAP, PINGPONG, WRITE_LSE, SECTIONS, True, EPILOGUE,
                HAS_KPM, HAS_SEQUSED, HAS_SEG, SOFTCAP, WINDOW_LEFT, HAS_SINKS)
            tile_count += 1
    if EPILOGUE == 1:
        tma.store_wait(0)


# ---------------------------------------------------------------------------------------------------------------
# Step 6: the kernel: shared memory, barriers, and the partitions.
# ---------------------------------------------------------------------------------------------------------------
# Lengths, head counts and strides are not specialised on (== 1, multiple of 16): one compile per config and dtype.
@gluon.jit(do_not_specialize=["seq_q", "seq_k", "heads_q", "group_size", "num_m_blocks", "num_tiles", "batch_heads",
                              "l2_heads", "stride_ob", "stride_oh", "stride_os", "head_dim"])
def _attn_fwd_sm90(desc_q, desc_k, desc_v, desc_o, out_ptr, lse_ptr, counter_ptr, kpm_ptr, seqused_ptr, seg_ptr,
                   sinks_ptr, qk_scale, seq_q, seq_k, heads_q, group_size, num_m_blocks, num_tiles, batch_heads,
                   l2_heads, stride_ob, stride_oh, stride_os, head_dim, stride_kpm_b, stride_seg_b,
                   BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr,
                   NUM_CONSUMERS: gl.constexpr, CAUSAL: gl.constexpr, OVERLAP: gl.constexpr,
                   PINGPONG: gl.constexpr, WRITE_LSE: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                   PRODUCER_REGS: gl.constexpr, SECTIONS: gl.constexpr, DYNAMIC: gl.constexpr,
                   EPILOGUE: gl.constexpr, HAS_KPM: gl.constexpr, HAS_SEQUSED: gl.constexpr,
                   HAS_SEG: gl.constexpr, SOFTCAP: gl.constexpr, WINDOW_LEFT: gl.constexpr,
                   HAS_SINKS: gl.constexpr):
    dtype: gl.constexpr = desc_q.dtype
    ROWS: gl.constexpr = desc_q.block_type.shape[2]
    BLOCK_M: gl.constexpr = ROWS * NUM_CONSUMERS
    q_smem = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS, 1, 1, ROWS, HEAD_DIM], desc_q.layout)
    if EPILOGUE == 1:
        o_smem = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS, 1, 1, ROWS, HEAD_DIM], desc_o.layout)
    else:
        o_smem = q_smem  # not written
    k_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, 1, 1, BLOCK_N, HEAD_DIM], desc_k.layout)
    v_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, 1, 1, BLOCK_N, HEAD_DIM], desc_v.layout)
    tile_slots = gl.allocate_shared_memory(gl.int32, [NUM_CONSUMERS, 1],
                                           gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
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

    # Two consumers: the default partition (this kernel's 4 warps) is consumer 0; consumer 1 and the producer
    # warp are workers. Three: the producer takes the default partition (all 4 warps wait, one issues) and
    # the consumers are workers, so all three get the same budget (the default partition's is what the
    # workers leave, and ptxas spills more in it at the same count).
    gl.static_assert(NUM_CONSUMERS == 2 or NUM_CONSUMERS == 3)
    if NUM_CONSUMERS == 2:
        gl.warp_specialize([
            (_consumer, (desc_o, out_ptr, lse_ptr, kpm_ptr, seqused_ptr, seg_ptr, sinks_ptr, q_smem, o_smem, k_smem,
                         v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turns, tile_slots, qk_scale,
                         seq_q, seq_k, heads_q, num_m_blocks, num_tiles, batch_heads, l2_heads, stride_ob, stride_oh,
                         stride_os, head_dim, stride_kpm_b, stride_seg_b, 0, BLOCK_M, BLOCK_N,
                         HEAD_DIM, NUM_STAGES, NUM_CONSUMERS, CAUSAL, OVERLAP, PINGPONG, WRITE_LSE, SECTIONS,
                         DYNAMIC, EPILOGUE, HAS_KPM, HAS_SEQUSED, HAS_SEG, SOFTCAP, WINDOW_LEFT, HAS_SINKS)),
            (_consumer, (desc_o, out_ptr, lse_ptr, kpm_ptr, seqused_ptr, seg_ptr, sinks_ptr, q_smem, o_smem, k_smem,
                         v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turns, tile_slots, qk_scale,
                         seq_q, seq_k, heads_q, num_m_blocks, num_tiles, batch_heads, l2_heads, stride_ob, stride_oh,
                         stride_os, head_dim, stride_kpm_b, stride_seg_b, 1, BLOCK_M, BLOCK_N,
                         HEAD_DIM, NUM_STAGES, NUM_CONSUMERS, CAUSAL, OVERLAP, PINGPONG, WRITE_LSE, SECTIONS,
                         DYNAMIC, EPILOGUE, HAS_KPM, HAS_SEQUSED, HAS_SEG, SOFTCAP, WINDOW_LEFT, HAS_SINKS)),
            (_producer, (desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty,
                         v_ready, v_empty, tile_slots, counter_ptr, seqused_ptr, seq_q, seq_k, heads_q, group_size,
                         num_m_blocks, num_tiles, batch_heads, l2_heads, BLOCK_M, BLOCK_N, NUM_STAGES,
                         NUM_CONSUMERS, CAUSAL, SECTIONS, DYNAMIC, HAS_SEQUSED, WINDOW_LEFT, 1)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([
            (_producer, (desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty,
                         v_ready, v_empty, tile_slots, counter_ptr, seqused_ptr, seq_q, seq_k, heads_q, group_size,
                         num_m_blocks, num_tiles, batch_heads, l2_heads, BLOCK_M, BLOCK_N, NUM_STAGES,
                         NUM_CONSUMERS, CAUSAL, SECTIONS, DYNAMIC, HAS_SEQUSED, WINDOW_LEFT, 4)),
            (_consumer, (desc_o, out_ptr, lse_ptr, kpm_ptr, seqused_ptr, seg_ptr, sinks_ptr, q_smem, o_smem, k_smem,
                         v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turns, tile_slots, qk_scale,
                         seq_q, seq_k, heads_q, num_m_blocks, num_tiles, batch_heads, l2_heads, stride_ob, stride_oh,
                         stride_os, head_dim, stride_kpm_b, stride_seg_b, 0, BLOCK_M, BLOCK_N,
                         HEAD_DIM, NUM_STAGES, NUM_CONSUMERS, CAUSAL, OVERLAP, PINGPONG, WRITE_LSE, SECTIONS,
                         DYNAMIC, EPILOGUE, HAS_KPM, HAS_SEQUSED, HAS_SEG, SOFTCAP, WINDOW_LEFT, HAS_SINKS)),
            (_consumer, (desc_o, out_ptr, lse_ptr, kpm_ptr, seqused_ptr, seg_ptr, sinks_ptr, q_smem, o_smem, k_smem,
                         v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turns, tile_slots, qk_scale,
                         seq_q, seq_k, heads_q, num_m_blocks, num_tiles, batch_heads, l2_heads, stride_ob, stride_oh,
                         stride_os, head_dim, stride_kpm_b, stride_seg_b, 1, BLOCK_M, BLOCK_N,
                         HEAD_DIM, NUM_STAGES, NUM_CONSUMERS, CAUSAL, OVERLAP, PINGPONG, WRITE_LSE, SECTIONS,
                         DYNAMIC, EPILOGUE, HAS_KPM, HAS_SEQUSED, HAS_SEG, SOFTCAP, WINDOW_LEFT, HAS_SINKS)),
            (_consumer, (desc_o, out_ptr, lse_ptr, kpm_ptr, seqused_ptr, seg_ptr, sinks_ptr, q_smem, o_smem, k_smem,
                         v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turns, tile_slots, qk_scale,
                         seq_q, seq_k, heads_q, num_m_blocks, num_tiles, batch_heads, l2_heads, stride_ob, stride_oh,
                         stride_os, head_dim, stride_kpm_b, stride_seg_b, 2, BLOCK_M, BLOCK_N,
                         HEAD_DIM, NUM_STAGES, NUM_CONSUMERS, CAUSAL, OVERLAP, PINGPONG, WRITE_LSE, SECTIONS,
                         DYNAMIC, EPILOGUE, HAS_KPM, HAS_SEQUSED, HAS_SEG, SOFTCAP, WINDOW_LEFT, HAS_SINKS)),
        ], [4, 4, 4], [CONSUMER_REGS, CONSUMER_REGS, CONSUMER_REGS])


# ---------------------------------------------------------------------------------------------------------------
# Step 7: the host side.
# ---------------------------------------------------------------------------------------------------------------


_EPILOGUE_CODES = {name: i for i, name in enumerate(EPILOGUES)}


def _constexprs(config: Sm90Config, head_dim: int, causal: bool, need_lse: bool, has_kpm: bool = False,
                has_seqused: bool = False, has_seg: bool = False, softcap: float = 0.0, window_left: int = -1,
                has_sinks: bool = False) -> dict:
    if config.pingpong and not config.overlap:
        raise ValueError("pingpong needs overlap")
    if config.dynamic and not config.persistent:
        raise ValueError("dynamic scheduling needs persistent")
    if config.num_consumers not in (2, 3):
        raise ValueError("num_consumers is 2 or 3")
    if config.epilogue not in _EPILOGUE_CODES:
        raise ValueError(f"epilogue is one of {EPILOGUES}")
    return dict(BLOCK_N=config.block_n, HEAD_DIM=KERNEL_HEAD_DIM[head_dim], NUM_STAGES=config.num_stages,
                NUM_CONSUMERS=config.num_consumers, CAUSAL=causal,
                OVERLAP=(2 if config.pin_pv_wait else 1) if config.overlap else 0,
                PINGPONG=config.pingpong, WRITE_LSE=need_lse, CONSUMER_REGS=config.consumer_regs,
                PRODUCER_REGS=config.producer_regs, SECTIONS=causal and config.persistent, DYNAMIC=config.dynamic,
                EPILOGUE=_EPILOGUE_CODES[config.epilogue], HAS_KPM=has_kpm, HAS_SEQUSED=has_seqused,
                HAS_SEG=has_seg, SOFTCAP=float(softcap or 0.0), WINDOW_LEFT=int(window_left), HAS_SINKS=has_sinks)


_COUNTERS: dict = {}  # (device index, stream) -> the int32 tile counter of the dynamic scheduler (self-resetting)
# (config, head_dim, causal, dtype, need_lse[, the names of the masks given]) -> the compiled kernel of the last
# launch, for inspection (registers, spills, shared memory).
COMPILED: dict = {}


def _tile_counter(device: torch.device) -> torch.Tensor:
    """The dynamic schedule's tile counter: zero before every launch, as each launch leaves it. One per stream, so
    launches that may overlap never share one."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, torch._C._cuda_getCurrentRawStream(index))
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(1, device=device, dtype=torch.int32)
    return _COUNTERS[key]


def _l2_heads(batch_heads: int, group_size: int, seq_k: int, head_dim: int, element_size: int) -> int:
    """(batch, head) pairs per causal L2 section: the K/V heads that fit in L2_KV_BYTES (a power of two, at least
    one), times the query heads that share each."""
    kv_bytes = 2 * seq_k * head_dim * element_size
    fit = max(1, L2_KV_BYTES // max(kv_bytes, 1))
    return max(1, min(batch_heads, (1 << (fit.bit_length() - 1)) * group_size))


def sm90_refusal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_padding_mask=None, seqused_k=None,
                 segment_ids=None) -> str | None:
    """Why this kernel can't serve the call, in a few words, or None when it can: Gluon present, a Hopper GPU (wgmma
    is sm90-only), 16-bit inputs, head dim 64/80/96/128/256, descriptor-legal strides (TMA: unit inner stride,
    16-byte aligned base and strides), Hq a multiple of Hkv; masks as flash_attn_forward_sm90 takes them."""
    if not HAS_GLUON:
        return "this Triton has no Gluon"
    if not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] != 9:
        return "not a Hopper (sm90) GPU"
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype} (fp16/bf16 only)"
    if not (q.dim() == 4 and k.shape == v.shape and q.shape[0] == k.shape[0] and q.shape[-1] == k.shape[-1]
            and k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0):
        return "shapes it does not take"
    if q.shape[-1] not in SM90_HEAD_DIMS:
        return f"head dim {q.shape[-1]} (takes {', '.join(map(str, SM90_HEAD_DIMS))})"
    if not all(_descriptor_legal(t) for t in (q, k, v)):
        return "strides a TMA descriptor can't take (inner stride 1, 16-byte aligned)"
    batch, seq_q, seq_k = q.shape[0], q.shape[2], k.shape[2]
    if key_padding_mask is not None and not (key_padding_mask.dtype == torch.bool and key_padding_mask.is_cuda
                                             and tuple(key_padding_mask.shape) == (batch, seq_k)):
        return "a key-padding mask other than bool [B, Sk]"
    if seqused_k is not None and not (seqused_k.dtype == torch.int32 and seqused_k.is_cuda
                                      and tuple(seqused_k.shape) == (batch, )):
        return "seqused_k other than int32 [B]"
    if segment_ids is not None and not (segment_ids.dtype == torch.int32 and segment_ids.is_cuda and seq_q == seq_k
                                        and tuple(segment_ids.shape) == (batch, seq_q)
                                        and segment_ids.stride(-1) == 1):
        return "segment ids other than contiguous int32 [B, S] with Sq == Sk"
    return None


def sm90_eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_padding_mask=None, seqused_k=None,
                  segment_ids=None) -> bool:
    """The kernel can serve this call (`sm90_refusal` says why not)."""
    return sm90_refusal(q, k, v, key_padding_mask=key_padding_mask, seqused_k=seqused_k,
                        segment_ids=segment_ids) is None


def flash_attn_forward_sm90(q, k, v, *, causal: bool, scale: float, need_lse: bool = True,
                            config: Sm90Config | None = None, key_padding_mask: torch.Tensor | None = None,
                            seqused_k: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                            softcap: float = 0.0, window: tuple[int, int] | None = None,
                            sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q: [B, Hq, Sq, D], k/v: [B, Hkv, Sk, D]. Returns out [B, Hq, Sq, D] (memory [B, Sq, Hq, D], q's dtype)
    and lse float32 [B, Hq, Sq] (natural log of the scaled scores' sum-exp; -inf for rows that see no key),
    or None for lse with need_lse=False.

    key_padding_mask: bool [B, Sk], True = attend. seqused_k: int32 [B] on the device: keys >= seqused_k[b]
    do not exist and causal alignment is to seqused_k[b]. segment_ids: int32 [B, S] (Sq == Sk), unit inner
    stride: a query sees only the keys of its own segment. softcap > 0: scores softcap * tanh(scale * q.k /
    softcap) (Gemma 2's logit softcapping), the lse of the capped scores; each value compiles its own kernel.
    window (left, right), causal only: query i sees keys i + Sk - Sq - left to i + Sk - Sq (right must be 0 or -1,
    left -1: no bound); the key blocks before a tile's band are not loaded. Each left compiles its own kernel.
    sinks: [Hq] floating point at unit stride, one logit per query head that joins every row's softmax with no value
    (gpt-oss' `s_aux`); the lse includes it, and a row that sees no key gives zeros and the sink as lse."""
    window_left = -1
    if window is not None:
        if not causal or window[1] not in (0, -1):
            raise ValueError("the sm90 kernel's windows are causal ones: window (left, 0) with causal=True")
        window_left = max(int(window[0]), -1)
    batch, heads_q, seq_q, head_dim = q.shape
    heads_k, seq_k = k.shape[1], k.shape[2]
    config = config or default_config(head_dim)
    width = KERNEL_HEAD_DIM[head_dim]
    if config.shared_bytes(head_dim, q.element_size()) > SHARED_MEMORY_LIMIT - 1024:
        raise ValueError(f"{config.label()} needs more shared memory than a block has at head dim {head_dim}")
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
    batch_heads = batch * heads_q
    num_tiles = num_m_blocks * batch_heads
    grid = min(num_tiles, sm_count(q.device)) if config.persistent else num_tiles
    counter = _tile_counter(q.device)  # also the stand-in for the masks a launch does not have (never read)
    lse_arg = lse if lse is not None else out  # never written without WRITE_LSE
    kpm = counter
    if key_padding_mask is not None:
        kpm = key_padding_mask if key_padding_mask.stride(-1) == 1 else key_padding_mask.contiguous()
        kpm = kpm.view(torch.uint8)
    compiled = _attn_fwd_sm90[(grid, )](
        _descriptor(q, CONSUMER_ROWS, width), _descriptor(k, config.block_n, width),
        _descriptor(v, config.block_n, width), _descriptor(out, CONSUMER_ROWS, width), out, lse_arg, counter, kpm,
        seqused_k if seqused_k is not None else counter, segment_ids if segment_ids is not None else counter,
        sinks if sinks is not None else counter, scale / softcap if softcap else scale * LOG2E.value, seq_q, seq_k,
        heads_q, heads_q // heads_k, num_m_blocks, num_tiles, batch_heads,
        _l2_heads(batch_heads, heads_q // heads_k, seq_k, head_dim, q.element_size()), out.stride(0),
        out.stride(1), out.stride(2), head_dim, kpm.stride(0) if key_padding_mask is not None else 0,
        segment_ids.stride(0) if segment_ids is not None else 0,
        **_constexprs(config, head_dim, causal, need_lse, key_padding_mask is not None, seqused_k is not None,
                      segment_ids is not None, softcap, window_left, sinks is not None), num_warps=4)
    masks = tuple(name for name, t in (("key_padding_mask", key_padding_mask), ("seqused_k", seqused_k),
                                       ("segment_ids", segment_ids), ("softcap", softcap or None),
                                       ("window", window if window_left >= 0 else None), ("sinks", sinks))
                  if t is not None)
    COMPILED[(config, head_dim, causal, q.dtype, need_lse) + ((masks, ) if masks else ())] = compiled
    return out, lse


# ---------------------------------------------------------------------------------------------------------------
# Compiling without a GPU, for tests and inspection (Triton's bundled ptxas).
# ---------------------------------------------------------------------------------------------------------------
def compile_sm90(config: Sm90Config, head_dim: int, *, causal: bool, dtype: torch.dtype = torch.bfloat16,
                 need_lse: bool = True, key_padding_mask: bool = False, seqused_k: bool = False,
                 segment_ids: bool = False, softcap: float = 0.0, window_left: int = -1, sinks: bool = False):
    """The kernel compiled for an sm90 target as a launch with `config` (and the named masks) would compile it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    width = KERNEL_HEAD_DIM[head_dim]

    def desc_type(rows):
        return mangle_type(_descriptor(torch.empty(1, 1, rows, head_dim, dtype=dtype), rows, width))

    kernel = _attn_fwd_sm90
    constexprs = _constexprs(config, head_dim, causal, need_lse, key_padding_mask, seqused_k, segment_ids, softcap,
                             window_left, sinks)
    elem = {torch.bfloat16: "*bf16", torch.float16: "*fp16"}[dtype]
    runtime = dict(desc_q=desc_type(CONSUMER_ROWS), desc_k=desc_type(config.block_n),
                   desc_v=desc_type(config.block_n), desc_o=desc_type(CONSUMER_ROWS), out_ptr=elem,
                   lse_ptr="*fp32" if need_lse else elem, counter_ptr="*i32",
                   kpm_ptr="*u8" if key_padding_mask else "*i32", seqused_ptr="*i32", seg_ptr="*i32",
                   sinks_ptr="*fp32" if sinks else "*i32",
                   qk_scale="fp32")
    names = kernel.arg_names
    signature = {n: "constexpr" if n in constexprs else runtime.get(n, "i32") for n in names}
    # What a launch specialises on: 16-byte aligned pointers, and mask row strides that are multiples of 16
    # (0 without the mask).
    aligned = [n for n in names if n.endswith("_ptr")] + ["stride_kpm_b", "stride_seg_b"]
    source = GluonASTSource(kernel, signature, constexprs={(names.index(n),): v for n, v in constexprs.items()},
                            attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
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


def _sass(compiled) -> str:
    import os
    import subprocess
    import tempfile

    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout


def loop_census(compiled) -> list[dict] | None:
    """The innermost loops that issue wgmma (the key loops of each consumer: unmasked and masked blocks, and the
    plain schedule's), from the cubin's SASS: instructions, wgmma, exp2, barrier syncs and spill loads/stores
    (STL/LDL) per iteration. None where cuobjdump is missing."""
    import re
    sass = _sass(compiled)
    if not sass:
        return None
    ins = [(int(m.group(1), 16), m.group(2)) for m in
           (re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line) for line in sass.splitlines()) if m]
    loops = []
    for addr, text in ins:
        # A loop closes with a predicated backward branch (the unconditional ones return from the out-of-line
        # mbarrier retry stubs).
        target = re.match(r"@!?U?P\d\s+BRA (0x[0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            loops.append((int(target.group(1), 16), addr))
    bodies = {span: [t for a, t in ins if span[0] <= a <= span[1]] for span in loops}
    mma = [span for span, body in bodies.items() if any("HGMMA" in t for t in body)]
    inner = [span for span in mma if not any(o != span and span[0] <= o[0] and o[1] <= span[1] for o in mma)]
    return [{"instructions": len(bodies[span]), "wgmma": sum("HGMMA" in t for t in bodies[span]),
             "exp2": sum("MUFU.EX2" in t for t in bodies[span]),
             "bar_sync": sum("BAR.SYNC" in t for t in bodies[span]),
             "spills": sum(bool(re.search(r"\b(STL|LDL)\b", t)) for t in bodies[span])} for span in sorted(inner)]


def ptx_census(ptx: str) -> dict:
    """What the PTX holds that the design relies on."""
    import re
    return {"wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
            "tma_loads": len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.shared::(?:cluster|cta)\.global", ptx)),
            "tma_stores": len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.global\.shared", ptx)),
            "setmaxnreg": sorted(set(re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx))),
            "atomics": len(re.findall(r"atom\.", ptx)), "bar_sync": len(re.findall(r"\bbar\.sync\b", ptx)),
            "ld_shared": len(re.findall(r"ld\.shared", ptx)), "st_shared": len(re.findall(r"st\.shared", ptx))}
