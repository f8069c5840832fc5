#!/usr/bin/env bash
# Session 5: the GPU suite's kernel files with launches now on the direct path (Triton 3.6's empty HookChain had sent
# every launch through Triton's runner), then host time per call and per decode step (~8 min).
# Usage: scripts/gpu_session5e.sh OUT_DIR
set -u
out=$1
export PYTHONUNBUFFERED=1
timeout 400 python3 -m pytest -q -n 8 --timeout 300 tests/test_gpu_attention.py tests/test_decode.py \
  tests/test_static_cache.py tests/test_launch.py tests/test_fp8.py tests/test_attention_op.py tests/test_backward.py \
  tests/test_compile.py tests/test_forward_tma.py tests/test_dropout.py tests/test_packed.py 2>&1 \
  | tee "$out/pytest.log" | grep -E "^E |FAILED|passed|failed" | tail -12
timeout 60 python3 scripts/adapter_host.py 2>&1 | grep "us/call" | tee "$out/adapter-host.txt"
timeout 90 python3 scripts/attention_host_share.py gpt2 all 512 2>&1 | grep -E "^\||gc coll" | tee "$out/host-share-gpt2.txt"
