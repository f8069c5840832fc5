#!/usr/bin/env bash
# Session 6, second H100 batch (~8 min): decode bandwidth with the new sm90 row and one wave of splits (batch 1, 8,
# 32); where a static-cache compiled decode step's time goes (Llama-2-7B shape, sdpa vs flashpatch); GPT-2 generation
# with the planned decode path. Usage: scripts/gpu_session6b.sh OUT_DIR
set -u
out=$1
export PYTHONUNBUFFERED=1
mkdir -p "$out/decode"; OUT="$out/decode" timeout 150 python3 scripts/gpu_decode.py --graph 2>&1 | tail -42
timeout 200 python3 scripts/static_step_anatomy.py 2>&1 | grep -v Warning | tee "$out/static-anatomy.txt" | tail -12
timeout 200 flashpatch bench gpt2 --contexts 512,2048,8192 --new-tokens 128 --repeats 3 \
  --json "$out/gen-gpt2-dynamic.json" > "$out/gen-gpt2-dynamic.log" 2>&1
python3 -c "import json; print(json.load(open('$out/gen-gpt2-dynamic.json'))['markdown'])"
