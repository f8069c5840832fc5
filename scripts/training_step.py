"""Training steps on one GPU: Llama-2-7B shape, forward + backward + AdamW step, samples/sec and
peak memory at batch x context shapes from 4x2K to 1x16K; eager, sdpa and flashpatch side by side. Writes under $OUT.

Usage: python3 scripts/gpu_training.py [LAYERS]  (default 8: a full 7B model's AdamW state does not fit 80 GB)
"""

import json
import os
import sys
import time

import torch
import triton
import transformers

from flashpatch.bench.train import bench_training, markdown
from flashpatch.presets import build_model

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 8
out_dir = os.environ.get("OUT", "out")
os.makedirs(out_dir, exist_ok=True)
env = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
       "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d"), "layers": layers,
       "command": " ".join(sys.argv)}
print(env, flush=True)
model = build_model("llama2-7b", layers=layers, dtype=torch.bfloat16, device="cuda", max_positions=8192)
shapes = [(4, 2048), (8, 2048), (4, 4096), (8, 4096), (2, 8192)]
rows = bench_training(model, shapes, progress=lambda: print(".", end="", flush=True))
table = markdown(rows)
with open(f"{out_dir}/training.json", "w") as f:
    json.dump({"env": env, "rows": [r.to_dict() for r in rows], "markdown": table}, f, indent=1)
print()
print(table)
