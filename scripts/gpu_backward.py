"""One GPU call: forward+backward timing vs SDPA's flash and cuDNN backends. Writes under $OUT."""

import json
import os
import sys
import time

import torch
import triton

from flashpatch.bench_kernels import bench_forward_backward, markdown_table

out_dir = os.environ.get("OUT", "out")
impls = ["flashpatch", "sdpa-flash", "sdpa-cudnn"]
env = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
       "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
rows = bench_forward_backward(impls)
table = markdown_table(rows, impls)
with open(f"{out_dir}/fwd-bwd.json", "w") as f:
    json.dump({"env": env, "rows": [r.to_dict() for r in rows]}, f, indent=1)
print(env)
print(table)
