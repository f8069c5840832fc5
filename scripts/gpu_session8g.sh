#!/usr/bin/env bash
# Session 8, last H100 batch (~5 min): GPU tests of the decode, static-cache and compiled paths after the plans for
# decode and prefill moved to one lookup (planned_forward); host time per decode call through transformers' entries.
# Usage: scripts/gpu_session8g.sh OUT_DIR
set -u
out=$1
export PYTHONUNBUFFERED=1
timeout 240 python3 -m pytest -q -n 8 --timeout 180 tests/test_decode.py tests/test_static_cache.py \
  tests/test_compile.py tests/test_gpu_models.py 2>&1 | tee "$out/pytest.log" | grep -E "^E |FAILED|passed|failed" | tail -8
timeout 60 python3 scripts/adapter_host.py 2>&1 | tee "$out/adapter-host.txt"
