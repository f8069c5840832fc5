#!/usr/bin/env bash
# Session 5: attention's share of a warm eager decode step, and static cache + compiled generation (~6 min).
# Usage: scripts/gpu_session5d.sh OUT_DIR
set -u
out=$1
export PYTHONUNBUFFERED=1
timeout 90 python3 scripts/attention_host_share.py gpt2 all 512 2>&1 | tail -5 | tee "$out/host-share-gpt2.txt"
timeout 120 python3 scripts/attention_host_share.py llama2-7b 8 512 2>&1 | tail -5 | tee "$out/host-share-llama8.txt"
timeout 200 flashpatch bench llama2-7b --cache static --baselines sdpa --contexts 512 --new-tokens 128 --repeats 2 \
  --json "$out/gen-llama-static.json" > "$out/gen-llama-static.log" 2>&1
python3 -c "import json; print(json.load(open('$out/gen-llama-static.json'))['markdown'])"
timeout 150 flashpatch bench gpt2 --cache static --contexts 512,2048 --new-tokens 128 --repeats 2 \
  --json "$out/gen-gpt2-static.json" > "$out/gen-gpt2-static.log" 2>&1
python3 -c "import json; print(json.load(open('$out/gen-gpt2-static.json'))['markdown'])"
