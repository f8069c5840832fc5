#!/usr/bin/env bash
# Session 8, fifth H100 batch (~8 min): generation (speedups as medians of per-repeat ratios): the Llama-2-7B shape
# at 8192 and 16384, three repeats, cold and warm.
# Usage: scripts/gpu_session8e.sh OUT_DIR
set -u
out=$1
export PYTHONUNBUFFERED=1
run() {  # name timeout model contexts
  timeout "$2" flashpatch bench "$3" --contexts "$4" --new-tokens 128 --repeats 3 --json "$out/gen-$1.json" \
    > "$out/gen-$1.log" 2>&1
  python3 -c "import json; print(json.load(open('$out/gen-$1.json'))['markdown'])"
}
run llama-8192-16384 500 llama2-7b 8192,16384
