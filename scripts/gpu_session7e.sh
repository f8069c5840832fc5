#!/usr/bin/env bash
# Session 7, fifth H100 batch (~9 min): Llama-2-7B-shape generation, cold and warm, turn order rotating: 512 with
# five repeats, then 4096 with three (each its own JSON, so a cut-off run keeps the first).
# Usage: scripts/gpu_session7e.sh OUT_DIR
set -u
out=$1
export PYTHONUNBUFFERED=1
timeout 280 flashpatch bench llama2-7b --contexts 512 --new-tokens 128 --repeats 5 \
  --json "$out/gen-llama-512.json" > "$out/gen-llama-512.log" 2>&1
python3 -c "import json; print(json.load(open('$out/gen-llama-512.json'))['markdown'])"
timeout 250 flashpatch bench llama2-7b --contexts 4096 --new-tokens 128 --repeats 3 \
  --json "$out/gen-llama-4096.json" > "$out/gen-llama-4096.log" 2>&1
python3 -c "import json; print(json.load(open('$out/gen-llama-4096.json'))['markdown'])"
