#!/usr/bin/env bash
# What the last session added after its GPU time ran out, in one H100 call (~9 min):
# the GPU tests (packed segments, every family's tile rows and autotune candidates, dropout), then issue 6's
# training table. Usage: scripts/gpu_pending.sh OUT_DIR
set -u
out=$1
python3 -m pytest -q -n 4 -ra tests/test_gpu_attention.py tests/test_dropout.py tests/test_packed.py \
  tests/test_autotune.py 2>&1 | tee "$out/pytest-pending.log" | tail -4
OUT=$out python3 scripts/gpu_training.py 8 2>&1 | tail -12
