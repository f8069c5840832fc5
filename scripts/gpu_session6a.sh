#!/usr/bin/env bash
# Session 6, first H100 batch (~9 min): GPU tests of the planned decode path; host time per attention call and per
# decode step; the decode kernel's merge unroll, warps and stages at batch 1; batch-1 decode bandwidth vs SDPA.
# Usage: scripts/gpu_session6a.sh OUT_DIR
set -u
out=$1
export PYTHONUNBUFFERED=1
timeout 240 python3 -m pytest -q -n 8 --timeout 200 tests/test_decode.py tests/test_static_cache.py tests/test_launch.py \
  tests/test_apply.py tests/test_gpu_attention.py tests/test_compile.py 2>&1 \
  | tee "$out/pytest.log" | grep -E "^E |FAILED|passed|failed" | tail -12
timeout 60 python3 scripts/adapter_host.py 2>&1 | grep "us/call" | tee "$out/adapter-host.txt"
timeout 90 python3 scripts/attention_host_share.py gpt2 all 512 2>&1 | grep -E "^\||gc coll" | tee "$out/host-share-gpt2.txt"
mkdir -p "$out/decode"; OUT="$out/decode" timeout 200 python3 scripts/gpu_decode.py --sweep-merge --graph --batch1 2>&1 \
  | tee "$out/decode.log" | tail -60
