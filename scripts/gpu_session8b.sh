#!/usr/bin/env bash
# Session 8, second H100 batch (~9 min): generation after the prefill plan, cold and warm, turn order rotating:
# GPT-2 (512, 2048, 8192; five repeats), then the Llama-2-7B shape at 1024 and 2048 (three repeats).
# Usage: scripts/gpu_session8b.sh OUT_DIR
set -u
out=$1
export PYTHONUNBUFFERED=1
timeout 340 flashpatch bench gpt2 --contexts 512,2048,8192 --new-tokens 128 --repeats 5 \
  --json "$out/gen-gpt2.json" > "$out/gen-gpt2.log" 2>&1
python3 -c "import json; print(json.load(open('$out/gen-gpt2.json'))['markdown'])"
timeout 230 flashpatch bench llama2-7b --contexts 1024,2048 --new-tokens 128 --repeats 3 \
  --json "$out/gen-llama-1024-2048.json" > "$out/gen-llama-1024-2048.log" 2>&1
python3 -c "import json; print(json.load(open('$out/gen-llama-1024-2048.json'))['markdown'])"
