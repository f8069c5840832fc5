#!/usr/bin/env bash
# Session 5: generation with dynamic cache, implementations alternating repeat by repeat (~8 min). An earlier
# version (GPT-2 under a 150 s limit, which it overran; Llama with --repeats 2) wrote gen-llama-dynamic-direct-launch.json.
# Usage: scripts/gpu_session5g.sh OUT_DIR
set -u
out=$1
export PYTHONUNBUFFERED=1
timeout 200 flashpatch bench gpt2 --contexts 512,2048,8192 --new-tokens 128 --repeats 3 \
  --json "$out/gen-gpt2-dynamic.json" > "$out/gen-gpt2-dynamic.log" 2>&1
python3 -c "import json; print(json.load(open('$out/gen-gpt2-dynamic.json'))['markdown'])"
timeout 320 flashpatch bench llama2-7b --contexts 512,4096 --new-tokens 128 --repeats 3 \
  --json "$out/gen-llama-dynamic.json" > "$out/gen-llama-dynamic.log" 2>&1
python3 -c "import json; print(json.load(open('$out/gen-llama-dynamic.json'))['markdown'])"
