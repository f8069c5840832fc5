"""One GPU call: environment, tile sweep, and the forward benchmark table. Writes under $OUT."""

import json
import os
import sys
import time

import torch
import triton
import transformers

from flashpatch.bench_kernels import SDPA_BACKENDS, bench_forward, markdown_table, tile_sweep
from flashpatch.kernels import TileConfig

out_dir = os.environ.get("OUT", "out")
os.makedirs(out_dir, exist_ok=True)
props = torch.cuda.get_device_properties(0)
env = {"gpu": props.name, "capability": torch.cuda.get_device_capability(0), "torch": torch.__version__,
       "triton": triton.__version__, "transformers": transformers.__version__,
       "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
print(env, flush=True)

if "--sweep" in sys.argv:
    candidates = [TileConfig(128, 64, 4, 3), TileConfig(128, 64, 8, 3), TileConfig(128, 128, 8, 3),
                  TileConfig(64, 64, 4, 3), TileConfig(128, 32, 4, 4), TileConfig(128, 128, 8, 2),
                  TileConfig(128, 64, 8, 3, tma=True), TileConfig(128, 128, 8, 2, tma=True),
                  TileConfig(128, 128, 8, 3, tma=True)]
    t = time.time()
    sweep = tile_sweep(candidates)
    with open(f"{out_dir}/sweep.txt", "w") as f:
        for row in sweep:
            print(*row, file=f)
            print(*row, flush=True)
    print(f"sweep {time.time() - t:.0f}s", flush=True)

if "--no-bench" in sys.argv:
    sys.exit(0)
impls = ["flashpatch"] + [f"sdpa-{b}" for b in SDPA_BACKENDS] + ["flex"]
t = time.time()
rows = bench_forward(impls)
print(f"bench {time.time() - t:.0f}s", flush=True)
with open(f"{out_dir}/kernels.json", "w") as f:
    json.dump({"env": env, "rows": [r.to_dict() for r in rows]}, f, indent=1)
table = markdown_table(rows, impls)
with open(f"{out_dir}/kernels.md", "w") as f:
    f.write(table + "\n")
print(table)
