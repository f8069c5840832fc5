#!/usr/bin/env bash
# H100: generation benchmarks for issue 5. Usage: scripts/gpu_generate.sh llama|others OUT_DIR
set -u
out=$2
if [ "$1" = llama ]; then
  flashpatch bench llama2-7b --contexts 512,1024,2048,4096,8192,16384 --new-tokens 128 --repeats 1 \
    --json "$out/gen-llama2-7b.json" --plot "$out/gen-llama2-7b.png"
else
  for m in gpt2 gptj-6b neox-20b; do
    flashpatch bench $m --contexts 1024 --new-tokens 128 --repeats 2 --json "$out/gen-$m.json"
  done
fi
