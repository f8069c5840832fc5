#!/usr/bin/env bash
# Session 5, second H100 batch (~7 min): GPU tests of the cached decode counters (CUDA graphs, cudagraph trees),
# the FP8 op and the table rows; host time per decode call; batch-1 decode bandwidth; the FP8 table with the
# Triton quantization pass. Usage: scripts/gpu_session5b.sh OUT_DIR
set -u
out=$1
export PYTHONUNBUFFERED=1
timeout 300 python3 -m pytest -q -n 8 --timeout 250 tests/test_fp8.py tests/test_decode.py tests/test_static_cache.py \
  tests/test_launch.py tests/test_gpu_attention.py tests/test_dispatch.py 2>&1 \
  | tee "$out/pytest.log" | grep -E "^E |FAILED|passed|failed" | tail -12
timeout 60 python3 scripts/host_overhead.py > "$out/host-overhead.txt" 2>&1; head -8 "$out/host-overhead.txt"
mkdir -p "$out/decode"; OUT="$out/decode" timeout 150 python3 scripts/gpu_decode.py --graph --batch1 2>&1 | tail -18
timeout 150 python3 scripts/gpu_fp8.py 2>&1 | tee "$out/fp8.txt" | tail -26
