#!/usr/bin/env bash
# H100 runs for issue 7. Usage: scripts/gpu_issue7.sh tests|generate OUT_DIR
set -u
out=$2
if [ "$1" = tests ]; then
  python3 -m pytest -q -n 8 tests/test_decode.py tests/test_static_cache.py tests/test_gpu_attention.py \
    tests/test_launch.py 2>&1 | tee "$out/pytest-decode.log" | tail -3
  python3 -m pytest -q tests/test_attention_op.py tests/test_backward.py -k head_dims 2>&1 | tee "$out/pytest-head-dims.log" | tail -3
  python3 scripts/gpu_decode.py 2>&1 | tee "$out/decode-run.log" | tail -17
  cp out/decode.* "$out/" 2>/dev/null
else
  flashpatch bench gpt2 --cache static --contexts 512,2048,8192 --new-tokens 128 --repeats 1 --json "$out/gen-gpt2-static.json" | tail -12
  flashpatch bench gpt2 --contexts 512,2048,8192 --new-tokens 128 --repeats 1 --json "$out/gen-gpt2-dynamic.json" | tail -12
  flashpatch bench llama2-7b --contexts 512,4096 --new-tokens 128 --repeats 1 --json "$out/gen-llama-dynamic.json" | tail -12
fi
