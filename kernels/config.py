"""Tile sizes per GPU generation: the one place a reader sees what each GPU gets.

Rows are (block_m, block_n, num_warps, num_stages) keyed by head-dim bucket. Shared
memory per program is about (block_m + 2 * num_stages * block_n) * padded_head_dim * 2
bytes for 16-bit inputs, which every row keeps under its GPU's per-block limit.
"""

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False  # the tensor-descriptor kernel (kernels/forward_tma.py) where a call allows it
    warp_specialize: bool = False  # TMA kernel only: Triton's producer/consumer warp groups for the unmasked loop

    def label(self) -> str:
        """'m128n64w8s3' (BLOCK_M, BLOCK_N, warps, stages), '+tma' / '+ws' for the TMA kernel's rows."""
        return (f"m{self.block_m}n{self.block_n}w{self.num_warps}s{self.num_stages}" + "+tma" * self.tma
                + "+ws" * self.warp_specialize)


# Per compute-capability family, per padded head dim (64, 128, 256).
# sm90 rows won a tile sweep on an H100 (`flashpatch.bench.kernels.tile_sweep`); sm80/sm86 rows follow the
# same shapes scaled to those GPUs' shared memory (163 KB and 99 KB per block).
TILE_TABLE: dict[str, dict[int, TileConfig]] = {
    "sm90": {
        64: TileConfig(128, 64, 8, 3),
        128: TileConfig(128, 64, 8, 3),
        256: TileConfig(64, 64, 4, 2),
    },
    "sm80": {
        64: TileConfig(128, 64, 4, 3),
        128: TileConfig(128, 64, 8, 2),
        256: TileConfig(64, 32, 4, 2),
    },
    "sm86": {
        64: TileConfig(128, 64, 4, 2),
        128: TileConfig(64, 64, 4, 2),
        256: TileConfig(64, 32, 4, 1),
    },
}

# Autotuning (kernels/autotune.py) times these per key on first use; the table's row comes first and is
# what runs with FLASHPATCH_AUTOTUNE=0 (on Hopper, where the Gluon kernel serves, its configs come before them).
# Alternatives are the runners-up of the sm90 sweep and their shared-memory-scaled cousins; tests/test_dispatch.py
# checks each fits its family's budget.
TUNE_ALTERNATIVES: dict[str, dict[int, list[TileConfig]]] = {
    "sm90": {64: [TileConfig(128, 64, 4, 3), TileConfig(64, 64, 4, 3)],
             128: [TileConfig(128, 128, 8, 3), TileConfig(128, 128, 8, 3, tma=True),
                   TileConfig(128, 128, 8, 3, tma=True, warp_specialize=True), TileConfig(64, 64, 4, 3)],
             256: [TileConfig(64, 32, 4, 3)]},
    "sm80": {64: [TileConfig(128, 64, 8, 3), TileConfig(64, 64, 4, 3)],
             128: [TileConfig(64, 64, 4, 3)],
             256: []},
    "sm86": {64: [TileConfig(64, 64, 4, 2)],
             128: [TileConfig(128, 32, 4, 2)],
             256: []},
}


# On an H100 the TMA tiles measured: at
# head dim 128, (128, 128, 8, 3) with TMA is level with or up to 3.5 % ahead of the best pointer tile on 3 of 4
# shapes, so it is a candidate; at head dim 64 every TMA tile lost. Its warp-specialised variant read 524 vs 491
# TFLOPS non-causal at N = 8192 but lost causal, so it is a
# candidate of its own. FLASHPATCH_TMA=0 leaves TMA tiles out.
TMA_SWITCH = "FLASHPATCH_TMA"


def tune_candidates(family: str, head_dim: int) -> list[TileConfig]:
    bucket = head_dim_bucket(head_dim)
    tma = os.environ.get(TMA_SWITCH) != "0"
    return [TILE_TABLE[family][bucket], *(c for c in TUNE_ALTERNATIVES[family][bucket] if tma or not c.tma)]


# FP8 forward (kernels/forward_fp8.py), Hopper only: one-byte K/V tiles take half the shared memory of 16-bit ones,
# so 128 keys per step fit three or four stages. Per head dim (64 or 128): the row, then the autotuning
# alternatives; both won shapes of an H100 sweep.
FP8_TABLE: dict[str, dict[int, list[TileConfig]]] = {
    "sm90": {64: [TileConfig(64, 128, 4, 3), TileConfig(128, 64, 8, 3)],
             128: [TileConfig(128, 128, 8, 4), TileConfig(64, 128, 4, 3)]},
}


def fp8_candidates(family: str | None, head_dim: int) -> list[TileConfig]:
    return [INTERPRETER_CONFIG] if family is None else FP8_TABLE[family][head_dim]


# Triton's CPU interpreter: small tiles so that short test sequences still cross several
# blocks, the causal diagonal and the ragged tail.
INTERPRETER_CONFIG = TileConfig(32, 16, 4, 1)

# Few query rows (decode, speculative verification): a 16-row tile wastes less work.
SHORT_Q_BLOCK_M = 16


def gpu_family(capability: tuple[int, int]) -> str | None:
    """The table family serving a compute capability, or None below sm80."""
    major, minor = capability
    if major >= 9:
        return "sm90"
    if major == 8:
        return "sm80" if minor == 0 else "sm86"
    return None


def head_dim_bucket(head_dim: int) -> int:
    for bucket in (64, 128, 256):
        if head_dim <= bucket:
            return bucket
    raise ValueError(f"head_dim {head_dim} > 256 is not supported")


# float32 inputs (exact IEEE dots on FMA units, no tensor cores): twice the bytes of a 16-bit tile, so rows that
# fit every family's shared memory at 4 bytes per element (tests/test_dispatch.py); never autotuned.
FP32_FORWARD: dict[int, TileConfig] = {64: TileConfig(64, 64, 4, 2), 128: TileConfig(64, 32, 4, 2),
                                       256: TileConfig(32, 32, 4, 1)}
FP32_DECODE: dict[int, TileConfig] = {64: TileConfig(16, 32, 4, 2), 128: TileConfig(16, 32, 4, 2),
                                      256: TileConfig(16, 16, 4, 2)}


def select_config(family: str | None, head_dim: int, seq_q: int, element_size: int = 2) -> TileConfig:
    """Tiles for a launch. family None means the interpreter."""
    if family is None:
        return INTERPRETER_CONFIG
    table = FP32_FORWARD if element_size == 4 else TILE_TABLE[family]
    row = table[head_dim_bucket(head_dim)]
    if seq_q <= SHORT_Q_BLOCK_M:
        return TileConfig(SHORT_Q_BLOCK_M, row.block_n, 4, row.num_stages)
    return row


# Flash-decoding (kernels/decode.py): block_m is unused (the tile holds a GQA group's query rows).
# Memory-bound, so the knobs are key-block length, warps and pipelining depth. Keyed by padded head dim.
# sm90 head dim 128: 64-key blocks four deep won batch 1 at 1K and 4K (1.40 and 2.41 TB/s against 1.30 and 2.31
# for 128-key blocks) and lost 1 % at 128K, on an H100.
DECODE_TABLE: dict[str, dict[int, TileConfig]] = {
    "sm90": {64: TileConfig(16, 128, 4, 3), 128: TileConfig(16, 64, 4, 4), 256: TileConfig(16, 32, 4, 3)},
    "sm80": {64: TileConfig(16, 64, 4, 3), 128: TileConfig(16, 64, 4, 3), 256: TileConfig(16, 32, 4, 2)},
    "sm86": {64: TileConfig(16, 64, 4, 2), 128: TileConfig(16, 64, 4, 2), 256: TileConfig(16, 32, 4, 2)},
}
INTERPRETER_DECODE_CONFIG = TileConfig(16, 16, 4, 1)
# The decode kernel holds every row (query tokens x GQA group) of a KV head in one tile: at most this many
# rows x padded head dim 16-bit elements (half as many at float32), which keeps the tile plus pipelined K/V blocks
# within every family's shared memory (tests/test_dispatch.py checks it).
DECODE_MAX_TILE = 128 * 128


def select_decode_config(family: str | None, head_dim: int, element_size: int = 2) -> TileConfig:
    if family is None:
        return INTERPRETER_DECODE_CONFIG
    return (FP32_DECODE if element_size == 4 else DECODE_TABLE[family])[head_dim_bucket(head_dim)]


# The tile of split launches (one program per SM, each reading a stretch of one (batch, KV head)'s cache), where it
# differs from the row's. sm90 head dim 128, CUDA-graph replays on an H200 (scripts/decode_rounds.py, same split
# counts): 128-key blocks three deep on 8 warps read batch 1 MHA at 1.91 / 3.01 / 4.10 / 4.59 TB/s for 1K / 4K / 16K /
# 128K keys against 1.82 / 2.77 / 3.65 / 4.00 for the row's 64-key blocks four deep (on 8 warps), GQA 32/8 batch 8 at
# 1K-128K 1.06x-1.12x, GQA batch 1 level at 1K and 0.99x at 4K. Held for tiles of at most DECODE_SPLIT_MAX_ROWS
# rows: the three stages take 192 KB of shared memory.
DECODE_SPLIT_TABLE: dict[str, dict[int, TileConfig]] = {"sm90": {128: TileConfig(16, 128, 8, 3)}}
DECODE_SPLIT_MAX_ROWS = 32


def decode_split_config(family: str | None, head_dim: int, rows: int, element_size: int = 2) -> TileConfig | None:
    """The tile for the decode kernel's split launches of `rows`-row tiles, or None for the decode row's own."""
    if family is None or element_size != 2 or rows > DECODE_SPLIT_MAX_ROWS:
        return None
    return DECODE_SPLIT_TABLE.get(family, {}).get(head_dim_bucket(head_dim))


def decode_rows(seq_q: int, group_size: int) -> int:
    """The decode tile's row count (a power of two, at least 16 for tl.dot)."""
    rows = seq_q * group_size
    return max(16, 1 << (rows - 1).bit_length())


def uses_decode_kernel(seq_q: int, group_size: int, head_dim: int, dropout_p: float, element_size: int = 2) -> bool:
    return (seq_q <= SHORT_Q_BLOCK_M and dropout_p == 0.0
            and decode_rows(seq_q, group_size) * head_dim_bucket(head_dim) * element_size <= 2 * DECODE_MAX_TILE)


# Pretend SM count under the interpreter, so that CPU tests exercise the split-KV path.
INTERPRETER_SM_COUNT = 8
MAX_SPLITS = 64
# Splits per (batch, KV head) fill the SMs once: with the merge unrolled, one wave read more than four at every
# batch-1 length swept on an H100 (2.91 vs 2.65 TB/s at 16K, 3.11 vs 3.03 at 128K).
DECODE_WAVES = 1
# Each split keeps at least this many key blocks (its fixed cost: loading Q, filling the pipeline, its share of the
# merge). Batch 1 on the H100 with 64-key blocks: 2 blocks let a 1K cache take 4 splits (1.77 TB/s against 1.36
# for 8 blocks, 2 splits) and a 512-token prompt's 640-key static cache 4 (1.22 against 0.93, one split).
MIN_SPLIT_BLOCKS = 2


def decode_splits(batch_heads: int, seq_q: int, seq_k: int, block_n: int, sm_count: int,
                  waves: int | None = None, min_blocks: int = MIN_SPLIT_BLOCKS) -> int:
    """How many programs share one (batch, head)'s keys: flash-decoding when few query rows would leave
    most SMs idle. A whole number of waves (a partial last wave leaves SMs idle while it runs), each split
    at least `min_blocks` key blocks. A function of shapes only (seq_k is the buffer's length), so a CUDA
    graph can capture the launch."""
    if seq_q > SHORT_Q_BLOCK_M or batch_heads >= sm_count:
        return 1
    if waves is None:
        waves = DECODE_WAVES
    by_length = seq_k // (min_blocks * block_n)
    return max(1, min(sm_count // batch_heads * waves, by_length, MAX_SPLITS))


# Backward tiles, one row per kernel: dK/dV (block_n keys held, block_m query rows streamed) and dQ (block_m
# queries held, block_n keys streamed). Shared memory is about (2 * held + 2 * num_stages * streamed) *
# padded_head_dim * 2 bytes; tests/test_dispatch.py checks every row against its family's budget.
@dataclass(frozen=True)
class BackwardConfig:
    dkdv: TileConfig
    dq: TileConfig


def backward_smem(cfg: BackwardConfig, head_dim: int) -> int:
    dkdv = (2 * cfg.dkdv.block_n + 2 * cfg.dkdv.num_stages * cfg.dkdv.block_m) * head_dim * 2
    dq = (2 * cfg.dq.block_m + 2 * cfg.dq.num_stages * cfg.dq.block_n) * head_dim * 2
    return max(dkdv, dq)


# sm90 rows (d64, d128) won a sweep on an H100 at N = 4096. The sm90 d256 row: the dK/dV kernel holds two fp32
# [block_n, 256] accumulators, which at 4 warps spill (1 KB of local memory per thread for (32, 64, 4, 2)); on 8 warps
# (64, 64, 8, 2) with dQ (128, 32, 8, 2) runs fwd+bwd at 226-274 TFLOPS on an H200 against 111-121 for the 4-warp
# row and 219-269 for SDPA's FA2 (N 2048-4096, BENCHMARKS.md; scripts/backward_tiles_sm90.py). The sm80/sm86 rows
# are the sm90 shapes cut to those budgets (fewer stages, smaller tiles).
BACKWARD_TABLE: dict[str, dict[int, BackwardConfig]] = {
    "sm90": {
        64: BackwardConfig(TileConfig(32, 128, 4, 3), TileConfig(128, 64, 8, 3)),
        128: BackwardConfig(TileConfig(64, 128, 8, 3), TileConfig(128, 64, 8, 3)),
        256: BackwardConfig(TileConfig(64, 64, 8, 2), TileConfig(128, 32, 8, 2)),
    },
    "sm80": {
        64: BackwardConfig(TileConfig(32, 128, 4, 3), TileConfig(128, 64, 8, 3)),
        128: BackwardConfig(TileConfig(64, 128, 8, 2), TileConfig(128, 64, 8, 2)),
        256: BackwardConfig(TileConfig(32, 64, 4, 2), TileConfig(64, 32, 4, 2)),
    },
    "sm86": {
        64: BackwardConfig(TileConfig(32, 128, 4, 3), TileConfig(128, 64, 8, 2)),
        128: BackwardConfig(TileConfig(32, 64, 4, 2), TileConfig(64, 32, 4, 2)),
        256: BackwardConfig(TileConfig(16, 32, 4, 2), TileConfig(32, 16, 4, 2)),
    },
}
INTERPRETER_BACKWARD_CONFIG = BackwardConfig(INTERPRETER_CONFIG, TileConfig(16, 32, 4, 1))


# float32 inputs (exact IEEE dots, no tensor cores): twice the bytes per element and FMA-built dots whose compile
# time grows with the tile, so small tiles everywhere.
FP32_BACKWARD: dict[int, BackwardConfig] = {
    64: BackwardConfig(TileConfig(32, 64, 4, 1), TileConfig(64, 32, 4, 1)),
    128: BackwardConfig(TileConfig(32, 64, 4, 1), TileConfig(64, 32, 4, 1)),
    256: BackwardConfig(TileConfig(16, 32, 4, 1), TileConfig(32, 16, 4, 1)),
}


def select_backward_config(family: str | None, head_dim: int, element_size: int = 2) -> BackwardConfig:
    if family is None:
        return INTERPRETER_BACKWARD_CONFIG
    table = FP32_BACKWARD if element_size == 4 else BACKWARD_TABLE[family]
    return table[head_dim_bucket(head_dim)]
