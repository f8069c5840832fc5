#!/usr/bin/env bash
# Session 8, fourth H100 batch (~9.5 min): generation (speedups as medians of per-repeat ratios): the GPT-NeoX-20B
# shape at 1024 and the Llama-2-7B shape at 4096, three repeats each, cold and warm.
# Usage: scripts/gpu_session8d.sh OUT_DIR
set -u
out=$1
export PYTHONUNBUFFERED=1
. "$(dirname "$0")/bench_json.sh"
bench_json "$out" neox 260 neox-20b 1024 3
bench_json "$out" llama-4096 300 llama2-7b 4096 3
