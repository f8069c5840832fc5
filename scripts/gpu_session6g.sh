#!/usr/bin/env bash
# Session 6, seventh H100 batch (~9 min): GPU tests with the cached split scratch; host time per attention call in a
# Llama-2-7B-shape decode step; Llama-2-7B-shape generation (dynamic cache, 512 and 4096).
# Usage: scripts/gpu_session6g.sh OUT_DIR
set -u
out=$1
export PYTHONUNBUFFERED=1
timeout 200 python3 -m pytest -q -n 8 --timeout 150 tests/test_decode.py tests/test_gpu_attention.py \
  tests/test_static_cache.py tests/test_apply.py tests/test_launch.py tests/test_compile.py 2>&1 \
  | tee "$out/pytest.log" | grep -E "^E |FAILED|passed|failed" | tail -8
timeout 120 python3 scripts/attention_host_share.py llama2-7b all 512 2>&1 | grep -E "^\||gc coll" | tee "$out/host-share-llama.txt"
timeout 260 flashpatch bench llama2-7b --contexts 512,4096 --new-tokens 128 --repeats 3 \
  --json "$out/gen-llama-dynamic.json" > "$out/gen-llama-dynamic.log" 2>&1
python3 -c "import json; print(json.load(open('$out/gen-llama-dynamic.json'))['markdown'])"
