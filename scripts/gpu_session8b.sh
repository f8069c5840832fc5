#!/usr/bin/env bash
# Session 8, second H100 batch (~9 min): generation after the prefill plan, cold and warm, turn order rotating:
# GPT-2 (512, 2048, 8192; five repeats), then the Llama-2-7B shape at 1024 and 2048 (three repeats).
# Usage: scripts/gpu_session8b.sh OUT_DIR
set -u
out=$1
export PYTHONUNBUFFERED=1
. "$(dirname "$0")/bench_json.sh"
bench_json "$out" gpt2 340 gpt2 512,2048,8192 5
bench_json "$out" llama-1024-2048 230 llama2-7b 1024,2048 3
