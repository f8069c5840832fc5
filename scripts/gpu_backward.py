"""One GPU call: forward+backward and backward-alone timing vs SDPA's backends and FlexAttention. Writes under $OUT."""

import json
import os
import sys
import time

import torch
import triton

from flashpatch.bench_kernels import BACKWARD_IMPLS, bench_backward, markdown_table

out_dir = os.environ.get("OUT", "out")
env = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
       "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
print(env, flush=True)
result = {"env": env}
for name, backward_only in (("forward+backward", False), ("backward", True)):
    rows = bench_backward(BACKWARD_IMPLS, backward_only=backward_only)
    result[name] = [r.to_dict() for r in rows]
    print(f"{name} (batch 8, 32 heads, bf16):")
    print(markdown_table(rows, BACKWARD_IMPLS), flush=True)
with open(f"{out_dir}/fwd-bwd.json", "w") as f:
    json.dump(result, f, indent=1)
