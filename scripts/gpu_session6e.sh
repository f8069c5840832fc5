#!/usr/bin/env bash
# Session 6, fifth H100 batch (~8 min): split length at short caches (batch 1, 640 to 4K keys); batch-1 decode at 1K
# in rounds against cuDNN and FA2; Llama-2-7B-shape generation (dynamic cache, 512 and 4096).
# Usage: scripts/gpu_session6e.sh OUT_DIR
set -u
out=$1
export PYTHONUNBUFFERED=1
mkdir -p "$out/sweep"; OUT="$out/sweep" timeout 90 python3 scripts/gpu_decode.py --sweep-min-blocks --no-bench 2>&1 | tail -26
timeout 40 python3 scripts/decode_rounds.py 1024 1 5 2>&1 | tee "$out/decode-rounds-1k.txt" | tail -4
timeout 330 flashpatch bench llama2-7b --contexts 512,4096 --new-tokens 128 --repeats 3 \
  --json "$out/gen-llama-dynamic.json" > "$out/gen-llama-dynamic.log" 2>&1
python3 -c "import json; print(json.load(open('$out/gen-llama-dynamic.json'))['markdown'])"
