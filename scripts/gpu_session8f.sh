#!/usr/bin/env bash
# Session 8, sixth H100 batch (~8 min): the cells that read under 1.0x with three repeats, again with seven
# (speedups as medians of per-repeat ratios): the Llama-2-7B shape at 1024 (cold and warm) and 4096 (warm).
# Usage: scripts/gpu_session8f.sh OUT_DIR
set -u
out=$1
export PYTHONUNBUFFERED=1
timeout 280 flashpatch bench llama2-7b --contexts 1024 --new-tokens 128 --repeats 7 \
  --json "$out/gen-llama-1024.json" > "$out/gen-llama-1024.log" 2>&1
python3 -c "import json; print(json.load(open('$out/gen-llama-1024.json'))['markdown'])"
timeout 200 flashpatch bench llama2-7b --contexts 4096 --regimes warm --new-tokens 128 --repeats 7 \
  --json "$out/gen-llama-4096-warm.json" > "$out/gen-llama-4096-warm.log" 2>&1
python3 -c "import json; print(json.load(open('$out/gen-llama-4096-warm.json'))['markdown'])"
