"""Decode bandwidth at one shape, measured in rounds: each round allocates fresh K/V and times every implementation
in turn (CUDA-graph replays: GPU time), so that where the buffers land and the machine's drift move all alike.
Prints each round, then median, min and max per implementation.

Usage (GPU): python3 scripts/decode_rounds.py [CACHE] [BATCH] [ROUNDS] [--kv-heads K] [--variants N,W,S,SPLITS ...]
(default 4096 1 10; 32 query heads, K = 32 KV heads, head dim 128, bf16; --variants last). Each variant is a decode tile (key block N, warps W, stages S)
with SPLITS programs per (batch, head), timed through `flash_decode_forward` beside the shipped dispatch.
"""

import statistics
import sys

import torch
import triton

from flashpatch.bench.kernels import kv_bytes, make_fn
from flashpatch.kernels import TileConfig, flash_decode_forward

argv = sys.argv[1:]
variants = argv[argv.index("--variants") + 1:] if "--variants" in argv else []
argv = argv[:len(argv) - len(variants)]
heads_k = 32
if "--kv-heads" in argv:
    at = argv.index("--kv-heads")
    heads_k = int(argv[at + 1])
    del argv[at:at + 2]
args = [a for a in argv if not a.startswith("--")]
cache = int(args[0]) if len(args) > 0 else 4096
batch = int(args[1]) if len(args) > 1 else 1
rounds = int(args[2]) if len(args) > 2 else 10
heads, head_dim = 32, 128


def variant_fn(spec, q, k, v):
    block_n, warps, stages, splits = map(int, spec.split(","))
    config = TileConfig(16, block_n, warps, stages)
    return lambda: flash_decode_forward(q, k, v, causal=False, scale=head_dim ** -0.5, key_padding_mask=None,
                                        seqused_k=None, config=config, num_splits=splits, need_lse=False)


impls = ["flashpatch", "sdpa-cudnn", "sdpa-flash", *variants]
seen = {impl: [] for impl in impls}
broken = set()
print(f"batch {batch}, cache {cache}, {heads} query heads, {heads_k} KV heads, head dim {head_dim}, bf16; "
      "TB/s of K/V read, CUDA-graph replays")
for r in range(rounds):
    q = torch.randn(batch, heads, 1, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, heads_k, cache, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    line = []
    for impl in impls:
        if impl in broken:
            continue
        fn = variant_fn(impl, q, k, v) if impl in variants else make_fn(impl, q, k, v, False)
        try:
            fn()
            ms = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        except Exception as exc:  # a variant that can't launch (shared memory): say so, go on
            print(f"{impl}: {type(exc).__name__}: {str(exc)[:120]}")
            broken.add(impl)
            continue
        seen[impl].append(kv_bytes(batch, heads_k, cache, head_dim) / (ms * 1e-3) / 1e12)
        line.append(f"{impl} {seen[impl][-1]:.3f}")
    print(f"round {r}: " + ", ".join(line), flush=True)
    del q, k, v
print("| implementation | median TB/s | min | max |\n|---|---|---|---|")
for impl, values in seen.items():
    if values:
        print(f"| {impl} | {statistics.median(values):.3f} | {min(values):.3f} | {max(values):.3f} |")
