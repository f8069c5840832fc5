#!/usr/bin/env bash
# Session 8, fifth H100 batch (~8 min): generation (speedups as medians of per-repeat ratios): the Llama-2-7B shape
# at 8192 and 16384, three repeats, cold and warm.
# Usage: scripts/gpu_session8e.sh OUT_DIR
set -u
out=$1
export PYTHONUNBUFFERED=1
. "$(dirname "$0")/bench_json.sh"
bench_json "$out" llama-8192-16384 500 llama2-7b 8192,16384 3
