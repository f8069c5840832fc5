#!/usr/bin/env bash
# H100: flashpatch verify on SmolLM2 (full WikiText-2 test, bf16 and fp16) and the random-weight presets.
# Usage: scripts/gpu_verify.sh GGUF_FILE WIKITEXT_FILE OUT_DIR
set -u
gguf=$1; text=$2; out=$3
run() { name=$1; shift; echo "== flashpatch verify $*"; flashpatch verify "$@" --json "$out/verify-$name.json"; echo "exit $?"; }
run smollm2-bf16 "$gguf" --text "$text" --dtype bf16
run smollm2-fp16 "$gguf" --text "$text" --dtype fp16
run llama2-7b llama2-7b --layers 4 --text "$text" --max-tokens 32768 --dtype bf16
run gpt2 gpt2 --text "$text" --max-tokens 32768 --context 1024 --dtype bf16
run gptj-6b gptj-6b --layers 4 --text "$text" --max-tokens 32768 --dtype bf16
run neox-20b neox-20b --layers 4 --text "$text" --max-tokens 32768 --dtype bf16
