#!/usr/bin/env bash
# Session 8, sixth H100 batch (~8 min): the cells that read under 1.0x with three repeats, again with seven
# (speedups as medians of per-repeat ratios): the Llama-2-7B shape at 1024 (cold and warm) and 4096 (warm).
# Usage: scripts/gpu_session8f.sh OUT_DIR
set -u
out=$1
export PYTHONUNBUFFERED=1
. "$(dirname "$0")/bench_json.sh"
bench_json "$out" llama-1024 280 llama2-7b 1024 7
bench_json "$out" llama-4096-warm 200 llama2-7b 4096 7 --regimes warm
