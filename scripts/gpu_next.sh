#!/usr/bin/env bash
# Session 5's first H100 call (~4 min; written by session 4, whose device time ran out before it):
# the warp-specialised TMA forward against cuDNN (issue 8), the backward's GPU tests since the direct launcher,
# and GPT-2's static-cache + compile generation with the one-launch decode (issue 7).
# Usage: scripts/gpu_next.sh OUT_DIR
set -u
out=$1
export PYTHONUNBUFFERED=1
timeout 200 python3 scripts/gpu_ws_probe.py 2>&1 | tee "$out/ws-probe.txt" | tail -13
timeout 150 python3 -m pytest -q -n 8 --timeout 120 tests/test_backward.py tests/test_dropout.py tests/test_packed.py tests/test_compile.py 2>&1 \
  | tee "$out/pytest-backward.log" | tail -2
timeout 220 flashpatch bench gpt2 --cache static --contexts 512,2048 --new-tokens 128 --repeats 1 \
  --json "$out/gen-gpt2-static.json" > /dev/null 2>&1
python3 -c "import json; print(json.load(open('$out/gen-gpt2-static.json'))['markdown'])"
