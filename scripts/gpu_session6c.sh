#!/usr/bin/env bash
# Session 6, third H100 batch (~8 min): batch-1 decode at 4K and 16K in rounds against cuDNN and FA2; where a
# static-cache compiled decode step's time goes (Llama-2-7B shape); GPT-2 generation with the planned decode path.
# Usage: scripts/gpu_session6c.sh OUT_DIR
set -u
out=$1
export PYTHONUNBUFFERED=1
timeout 60 python3 scripts/decode_rounds.py 4096 1 10 2>&1 | tee "$out/decode-rounds-4k.txt" | tail -5
timeout 40 python3 scripts/decode_rounds.py 16384 1 5 2>&1 | tee "$out/decode-rounds-16k.txt" | tail -5
timeout 200 python3 scripts/static_step_anatomy.py 2>&1 | grep -v Warning | tee "$out/static-anatomy.txt" | tail -12
timeout 270 flashpatch bench gpt2 --contexts 512,2048,8192 --new-tokens 128 --repeats 3 \
  --json "$out/gen-gpt2-dynamic.json" > "$out/gen-gpt2-dynamic.log" 2>&1
python3 -c "import json; print(json.load(open('$out/gen-gpt2-dynamic.json'))['markdown'])"
