#!/usr/bin/env bash
# Session 6, sixth H100 batch (~9 min): GPU tests of the decode path (two key blocks per split); batch-1 decode at
# 640 keys and 1K in rounds; host time per attention call in a Llama-2-7B-shape decode step; where a static-cache
# compiled step's time goes (kernels only). Usage: scripts/gpu_session6f.sh OUT_DIR
set -u
out=$1
export PYTHONUNBUFFERED=1
timeout 200 python3 -m pytest -q -n 8 --timeout 150 tests/test_decode.py tests/test_gpu_attention.py \
  tests/test_static_cache.py tests/test_apply.py tests/test_launch.py tests/test_compile.py 2>&1 \
  | tee "$out/pytest.log" | grep -E "^E |FAILED|passed|failed" | tail -8
timeout 30 python3 scripts/decode_rounds.py 640 1 5 2>&1 | tee "$out/decode-rounds-640.txt" | tail -4
timeout 30 python3 scripts/decode_rounds.py 1024 1 5 2>&1 | tee "$out/decode-rounds-1k.txt" | tail -4
timeout 120 python3 scripts/attention_host_share.py llama2-7b all 512 2>&1 | grep -E "^\||gc coll" | tee "$out/host-share-llama.txt"
timeout 200 python3 scripts/static_step_anatomy.py 2>&1 | grep -v -i warn | tee "$out/static-anatomy.txt" | tail -9
