#!/usr/bin/env bash
# Session 7, fourth H100 batch (~10 min; the first try, 280 s and 270 s, ran out before writing any JSON): generation with the turn order rotating repeat by repeat and each repeat's
# rate kept: GPT-2 (512, 2048, 8192; five repeats) and the Llama-2-7B shape (512, 4096; three), cold and warm.
# Usage: scripts/gpu_session7d.sh OUT_DIR
set -u
out=$1
export PYTHONUNBUFFERED=1
timeout 340 flashpatch bench gpt2 --contexts 512,2048,8192 --new-tokens 128 --repeats 5 \
  --json "$out/gen-gpt2-dynamic.json" > "$out/gen-gpt2-dynamic.log" 2>&1
python3 -c "import json; print(json.load(open('$out/gen-gpt2-dynamic.json'))['markdown'])"
timeout 230 flashpatch bench llama2-7b --contexts 512,4096 --new-tokens 128 --repeats 3 \
  --json "$out/gen-llama-dynamic.json" > "$out/gen-llama-dynamic.log" 2>&1
python3 -c "import json; print(json.load(open('$out/gen-llama-dynamic.json'))['markdown'])"
