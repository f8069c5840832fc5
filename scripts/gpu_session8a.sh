#!/usr/bin/env bash
# Session 8, first H100 batch (~9 min): prefill calls through a ForwardPlan (the launch worked out once per call
# signature). GPU tests of the op, launcher and patching; host time of one prefill call and per attention call in
# an 8-layer Llama-2-7B-shape prefill (sdpa vs flashpatch); Llama-2-7B-shape generation at 512, five repeats.
# Usage: scripts/gpu_session8a.sh OUT_DIR
set -u
out=$1
export PYTHONUNBUFFERED=1
timeout 200 python3 -m pytest -q -n 8 --timeout 150 tests/test_gpu_attention.py tests/test_attention_op.py \
  tests/test_apply.py tests/test_launch.py 2>&1 | tee "$out/pytest.log" | grep -E "^E |FAILED|passed|failed" | tail -8
timeout 40 python3 scripts/prefill_call_profile.py > "$out/prefill-call.txt" 2>&1; head -30 "$out/prefill-call.txt"
timeout 60 python3 scripts/prefill_host.py > "$out/prefill-host.txt" 2>&1; head -5 "$out/prefill-host.txt"
timeout 250 flashpatch bench llama2-7b --contexts 512 --new-tokens 128 --repeats 5 \
  --json "$out/gen-llama-512.json" > "$out/gen-llama-512.log" 2>&1
python3 -c "import json; print(json.load(open('$out/gen-llama-512.json'))['markdown'])"
