#!/usr/bin/env bash
# Session 8, eighth H100 batch (~5 min): the Llama-2-7B shape at 1024 again (its 7-repeat run in `f/` ran out of
# time before saving), five repeats, cold and warm.
# Usage: scripts/gpu_session8h.sh OUT_DIR
set -u
out=$1
export PYTHONUNBUFFERED=1
. "$(dirname "$0")/bench_json.sh"
bench_json "$out" llama-1024 400 llama2-7b 1024 5
