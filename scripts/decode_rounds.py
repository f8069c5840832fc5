"""Decode bandwidth at one shape, measured in rounds: each round allocates fresh K/V and times every implementation
in turn (CUDA-graph replays: GPU time), so that where the buffers land and the machine's drift move all alike.
Prints each round, then median, min and max per implementation.

Usage (GPU): python3 scripts/decode_rounds.py [CACHE] [BATCH] [ROUNDS]   (default 4096 1 10; 32 heads, head dim 128, bf16)
"""

import statistics
import sys

import torch
import triton

from flashpatch.bench_kernels import kv_bytes, make_fn

cache = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 1
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 10
heads, head_dim = 32, 128
impls = ["flashpatch", "sdpa-cudnn", "sdpa-flash"]
seen = {impl: [] for impl in impls}
print(f"batch {batch}, cache {cache}, {heads} heads, head dim {head_dim}, bf16; TB/s of K/V read, CUDA-graph replays")
for r in range(rounds):
    q = torch.randn(batch, heads, 1, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, heads, cache, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    line = []
    for impl in impls:
        fn = make_fn(impl, q, k, v, False)
        fn()
        ms = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        seen[impl].append(kv_bytes(batch, heads, cache, head_dim) / (ms * 1e-3) / 1e12)
        line.append(f"{impl} {seen[impl][-1]:.3f}")
    print(f"round {r}: " + ", ".join(line), flush=True)
    del q, k, v
print("| implementation | median TB/s | min | max |\n|---|---|---|---|")
for impl, values in seen.items():
    print(f"| {impl} | {statistics.median(values):.3f} | {min(values):.3f} | {max(values):.3f} |")
