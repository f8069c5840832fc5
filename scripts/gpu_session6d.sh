#!/usr/bin/env bash
# Session 6, fourth H100 batch (~9 min): GPU tests touched by the unpadded-decode mask shortcut; host time per
# attention call in a GPT-2 decode step; where a static-cache compiled step's time goes (Llama-2-7B shape); GPT-2
# generation (dynamic cache). Usage: scripts/gpu_session6d.sh OUT_DIR
set -u
out=$1
export PYTHONUNBUFFERED=1
timeout 150 python3 -m pytest -q -n 8 --timeout 120 tests/test_apply.py tests/test_static_cache.py 2>&1 \
  | tee "$out/pytest.log" | grep -E "^E |FAILED|passed|failed" | tail -8
timeout 90 python3 scripts/attention_host_share.py gpt2 all 512 2>&1 | grep -E "^\||gc coll" | tee "$out/host-share-gpt2.txt"
timeout 200 python3 scripts/static_step_anatomy.py 2>&1 | grep -v -i warn | tee "$out/static-anatomy.txt" | tail -9
timeout 270 flashpatch bench gpt2 --contexts 512,2048,8192 --new-tokens 128 --repeats 3 \
  --json "$out/gen-gpt2-dynamic.json" > "$out/gen-gpt2-dynamic.log" 2>&1
python3 -c "import json; print(json.load(open('$out/gen-gpt2-dynamic.json'))['markdown'])"
