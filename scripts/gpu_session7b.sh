#!/usr/bin/env bash
# Session 7, second H100 batch (~8 min): GPU tests with addresses handed to the launcher as integers and 8-warp
# head-dim-128 decode tiles; decode rounds (batch 1 at 256 to 128K keys, batch 8 and 32 at 4K) beside cuDNN; host
# time per attention call.
# Usage: scripts/gpu_session7b.sh OUT_DIR
set -u
out=$1
export PYTHONUNBUFFERED=1
timeout 220 python3 -m pytest -q -n 8 --timeout 150 tests/test_decode.py tests/test_gpu_attention.py \
  tests/test_static_cache.py tests/test_apply.py tests/test_launch.py tests/test_compile.py 2>&1 \
  | tee "$out/pytest.log" | grep -E "^E |FAILED|passed|failed" | tail -8
for n in 4096 1024 16384 131072; do
  timeout 100 python3 scripts/decode_rounds.py $n 1 7 --variants 64,4,4,4 2>&1 | tee "$out/rounds-$n.txt" | grep -E "^\|"
done
timeout 60 python3 scripts/decode_rounds.py 256 1 5 --variants 64,8,4,1 64,8,4,2 2>&1 | tee "$out/rounds-256.txt" | grep -E "^\|"
for b in 8 32; do
  timeout 80 python3 scripts/decode_rounds.py 4096 $b 5 --variants 64,4,4,1 2>&1 | tee "$out/rounds-4096-b$b.txt" | grep -E "^\|"
done
timeout 60 python3 scripts/adapter_host.py 2>&1 | tee "$out/adapter-host.txt"
timeout 90 python3 scripts/attention_host_share.py gpt2 all 512 > "$out/host-share-gpt2.txt" 2>&1
grep -E "^\|" "$out"/host-share-*.txt
