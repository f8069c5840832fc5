#!/usr/bin/env bash
# First H100 call of the next session (~8 min): the tensor-descriptor (TMA) forward's GPU tests and its sweep
# against the pointer kernel's tiles (issue 8), then the GPU tests touched since the last GPU run.
# Usage: scripts/gpu_next.sh OUT_DIR      (the SmolLM2 loss curves need scripts/gpu_losscurves.sh, two calls)
set -u
out=$1
export FLASHPATCH_TMA=1
timeout 240 python3 -m pytest -q -n 4 --timeout 120 -ra tests/test_forward_tma.py tests/test_gpu_attention.py \
  tests/test_attention_op.py -k "tma or table_row or backward_row or autocast" 2>&1 | tee "$out/pytest-next.log" | tail -4
OUT=$out timeout 300 python3 scripts/gpu_kernels.py --sweep --no-bench 2>&1 | tail -40
