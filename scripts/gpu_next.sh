#!/usr/bin/env bash
# One H100 call (~9 min): the tensor-descriptor (TMA) forward's GPU tests and its sweep against the pointer
# kernel's tiles (issue 8), then where a decode call's host time goes (issues 5 and 7).
# Usage: scripts/gpu_next.sh OUT_DIR
set -u
out=$1
export FLASHPATCH_TMA=1
timeout 150 python3 -m pytest -q -n 4 --timeout 120 -ra tests/test_forward_tma.py tests/test_gpu_attention.py \
  tests/test_attention_op.py -k "tma or table_row or backward_row or autocast" 2>&1 | tee "$out/pytest-next.log" | tail -4
OUT=$out timeout 300 python3 scripts/gpu_kernels.py --sweep --no-bench > "$out/sweep-stdout.txt" 2>&1
tail -1 "$out/sweep-stdout.txt"; cat "$out/sweep.txt"
timeout 90 python3 scripts/host_overhead.py 2>&1 | tee "$out/host-overhead.txt"
