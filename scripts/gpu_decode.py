"""One GPU call for issue 7's kernel half: decode tile sweep, then decode bandwidth vs SDPA's backends. Writes under $OUT."""

import json
import os
import sys
import time

import torch
import triton
import transformers

from flashpatch.bench_kernels import bench_decode, decode_markdown, decode_sweep
from flashpatch.kernels import TileConfig

out_dir = os.environ.get("OUT", "out")
os.makedirs(out_dir, exist_ok=True)
env = {"gpu": torch.cuda.get_device_properties(0).name, "torch": torch.__version__, "triton": triton.__version__,
       "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
print(env, flush=True)

if any(flag in sys.argv for flag in ("--sweep", "--sweep-merge", "--sweep-min-blocks")):
    t = time.time()
    candidates = [(TileConfig(16, n, 4, 3), waves, 2) for n in (64, 128) for waves in (1, 2, 4)]
    cases = ((1, 1024), (1, 4096), (1, 16384), (1, 32768), (1, 131072), (2, 8192), (4, 65536), (8, 16384))
    if "--sweep-merge" in sys.argv:  # session 6: the merge's unroll, warps and stages at batch 1
        candidates = [(TileConfig(16, n, warps, stages), waves, 8, unroll) for n, warps, stages in
                      ((128, 4, 3), (128, 8, 3), (128, 4, 4), (64, 4, 4), (64, 8, 4))
                      for waves in (1, 4) for unroll in (1, 4)]
        cases = ((1, 1024), (1, 4096), (1, 16384), (1, 131072))
    if "--sweep-min-blocks" in sys.argv:  # session 6: short caches (a 512-token prompt's static cache is 640 keys)
        candidates = [(TileConfig(16, 64, 4, 4), 1, min_blocks) for min_blocks in (1, 2, 4, 8)]
        cases = ((1, 640), (1, 1024), (1, 2048), (1, 4096), (4, 1024), (8, 640))
    with open(f"{out_dir}/decode-sweep.txt", "w") as f:
        for row in decode_sweep(candidates, cases):
            print(*row, file=f)
    for line in open(f"{out_dir}/decode-sweep.txt"):
        print(line.rstrip())
    print(f"sweep {time.time() - t:.0f}s", flush=True)

if "--no-bench" in sys.argv:
    sys.exit(0)
impls = ["flashpatch", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math"]
batches = (1,) if "--batch1" in sys.argv else (1, 8, 32)
modes = ["eager", "graph"] if "--graph" in sys.argv else ["eager"]
tables, dump = [], {"env": env}
for mode in modes:
    t = time.time()
    rows = bench_decode(impls, batches=batches, cuda_graph=mode == "graph")
    print(f"bench ({mode}) {time.time() - t:.0f}s", flush=True)
    dump[mode] = [r.to_dict() for r in rows]
    what = ("calls back to back (host launch cost included)" if mode == "eager"
            else "CUDA-graph replays (GPU time only, every backend alike)")
    tables.append(f"Timing: {what}\n\n" + decode_markdown(rows, impls))
with open(f"{out_dir}/decode.json", "w") as f:
    json.dump(dump, f, indent=1)
with open(f"{out_dir}/decode.md", "w") as f:
    f.write("\n\n".join(tables) + "\n")
print("\n\n".join(tables))
