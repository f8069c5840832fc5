#!/usr/bin/env bash
# Session 8, third H100 batch (~9.5 min): generation with speedups as medians of per-repeat ratios and no garbage
# collection inside timed calls: the Llama-2-7B shape at 2048 and 4096 and the GPT-J-6B shape at 1024 (three
# repeats each, cold and warm).
# Usage: scripts/gpu_session8c.sh OUT_DIR
set -u
out=$1
export PYTHONUNBUFFERED=1
run() {  # name timeout model contexts
  timeout "$2" flashpatch bench "$3" --contexts "$4" --new-tokens 128 --repeats 3 --json "$out/gen-$1.json" \
    > "$out/gen-$1.log" 2>&1
  python3 -c "import json; print(json.load(open('$out/gen-$1.json'))['markdown'])"
}
run llama-2048-4096 330 llama2-7b 2048,4096
run gptj 240 gptj-6b 1024
