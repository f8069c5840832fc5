#!/usr/bin/env bash
# Session 5's H100 batch (~8 min): GPU tests of the FP8 forward, the warp-specialised TMA candidate and the bench
# warm-up; the FP8 tile sweep and accuracy (issue 8 stretch); where warm dynamic-cache decode spends host time.
# Usage: scripts/gpu_session5.sh OUT_DIR
set -u
out=$1
export PYTHONUNBUFFERED=1
timeout 240 python3 -m pytest -q -n 8 --timeout 200 tests/test_fp8.py tests/test_forward_tma.py \
  "tests/test_gpu_attention.py::test_every_table_row_and_tune_candidate_compiles_fits_and_is_correct" 2>&1 \
  | tee "$out/pytest.log" | grep -E "^E |FAILED|passed|failed" | tail -8
timeout 200 python3 scripts/gpu_fp8.py --sweep 2>&1 | tee "$out/fp8.txt" | tail -28
# decode-host-profile.txt came from scripts/decode_host_profile.py (commit 35336fc), since folded into:
timeout 150 python3 scripts/attention_host_share.py llama2-7b 8 512 --profile > "$out/decode-host-profile.txt" 2>&1
tail -6 "$out/decode-host-profile.txt"
