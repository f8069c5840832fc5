#!/usr/bin/env bash
# Session 7, third H100 batch (~9 min): decode GPU tests with split-only 8-warp tiles; the decode table (batch 1, 8,
# 32, CUDA-graph replays) vs SDPA's backends; GPT-2 generation, cold and warm, five repeats.
# Usage: scripts/gpu_session7c.sh OUT_DIR
set -u
out=$1
export PYTHONUNBUFFERED=1
timeout 120 python3 -m pytest -q -n 8 --timeout 100 tests/test_decode.py tests/test_gpu_attention.py -k "decode or split" \
  2>&1 | tee "$out/pytest.log" | grep -E "^E |FAILED|passed|failed" | tail -8
mkdir -p "$out/decode"; OUT="$out/decode" timeout 170 python3 scripts/gpu_decode.py --graph 2>&1 | tail -24
timeout 290 flashpatch bench gpt2 --contexts 512,2048,8192 --new-tokens 128 --repeats 5 \
  --json "$out/gen-gpt2-dynamic.json" > "$out/gen-gpt2-dynamic.log" 2>&1
python3 -c "import json; print(json.load(open('$out/gen-gpt2-dynamic.json'))['markdown'])"
