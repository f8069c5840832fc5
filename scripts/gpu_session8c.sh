#!/usr/bin/env bash
# Session 8, third H100 batch (~9.5 min): generation with speedups as medians of per-repeat ratios and no garbage
# collection inside timed calls: the Llama-2-7B shape at 2048 and 4096 and the GPT-J-6B shape at 1024 (three
# repeats each, cold and warm).
# Usage: scripts/gpu_session8c.sh OUT_DIR
set -u
out=$1
export PYTHONUNBUFFERED=1
. "$(dirname "$0")/bench_json.sh"
bench_json "$out" llama-2048-4096 330 llama2-7b 2048,4096 3
bench_json "$out" gptj 240 gptj-6b 1024 3
