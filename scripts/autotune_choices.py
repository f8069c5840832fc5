"""Whether the autotuner picks the fastest forward candidate: its own timings beside do_bench's, per cell.

For each (head dim, causal, N) cell of a bf16 self-attention (batch B, H heads): a fresh autotune cache, one
`flashpatch.attention` call (the autotuner times every candidate as it does in use: `kernels/autotune.py`'s
`time_ms`), then each candidate forced in turn and timed through `flashpatch.attention` with
`triton.testing.do_bench` (median of many calls). Prints, per cell, every candidate's two timings, the autotuner's
choice, do_bench's fastest and how much slower the choice is than it (1.00 = it picked the fastest).

Usage (GPU): PYTHONUNBUFFERED=1 python3 scripts/autotune_choices.py [--head-dims 128,64] [--lengths 2048,16384]
[--batch 8] [--heads 32] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
import triton

import flashpatch
from flashpatch import ops
from flashpatch.kernels import AUTOTUNER


def tuned_call(q, k, v, causal):
    """The autotuner's choice for this call and its timings, from a cache of its own (nothing remembered)."""
    ops.reset_caches()
    flashpatch.attention(q, k, v, causal=causal)
    torch.cuda.synchronize()
    (used,) = [u for u in flashpatch.kernels_used() if u["causal"] == causal]
    return used["tile"], used["tuning"]["timed_ms"] if used["tuning"] else None


def forced_ms(q, k, v, causal, label):
    """do_bench of flashpatch.attention with the candidate `label` forced on this call's kind."""
    real_pick = AUTOTUNER.pick

    def pick(family, key, candidates, timed):
        (chosen,) = [c for c in candidates if c.label() == label]
        return chosen

    AUTOTUNER.pick = pick
    try:
        ops.reset_caches()
        fn = lambda: flashpatch.attention(q, k, v, causal=causal)  # noqa: E731
        fn()
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    finally:
        AUTOTUNER.pick = real_pick
        ops.reset_caches()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--head-dims", default="128,64")
    parser.add_argument("--lengths", default="2048,16384")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--out")
    args = parser.parse_args()
    os.environ["FLASHPATCH_AUTOTUNE"] = "1"
    os.environ["FLASHPATCH_CACHE_DIR"] = tempfile.mkdtemp(prefix="flashpatch-autotune-")
    rows = []
    for head_dim in map(int, args.head_dims.split(",")):
        for n in map(int, args.lengths.split(",")):
            for causal in (False, True):
                q, k, v = (torch.randn(args.batch, args.heads, n, head_dim, device="cuda", dtype=torch.bfloat16)
                           for _ in range(3))
                choice, timed = tuned_call(q, k, v, causal)
                if timed is None:
                    print(f"d{head_dim} causal={causal} N={n}: nothing tuned (served by {choice})", flush=True)
                    continue
                bench = {label: forced_ms(q, k, v, causal, label) for label in timed}
                best = min(bench, key=bench.get)
                row = dict(head_dim=head_dim, causal=causal, n=n, choice=choice, best=best,
                           choice_over_best=bench[choice] / bench[best], tuner_ms=timed, do_bench_ms=bench)
                rows.append(row)
                print(f"d{head_dim} causal={causal} N={n}: chose {choice}, fastest {best}, "
                      f"{row['choice_over_best']:.2f}x its time", flush=True)
                for label in timed:
                    print(f"    {label:32s} tuner {timed[label]:8.3f} ms   do_bench {bench[label]:8.3f} ms", flush=True)
                del q, k, v
    print("\n| D | causal | N | chosen | fastest (do_bench) | chosen / fastest |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['head_dim']} | {'yes' if r['causal'] else 'no'} | {r['n']} | {r['choice']} | {r['best']} | "
              f"{r['choice_over_best']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
