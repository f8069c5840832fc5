#!/usr/bin/env bash
# Session 7, first H100 batch (~7 min): decode tiles x splits per head (co-resident programs) at batch 1, in rounds
# beside cuDNN; where a warm eager decode step's host time goes, sdpa vs flashpatch (cProfile).
# Usage: scripts/gpu_session7a.sh OUT_DIR
set -u
out=$1
export PYTHONUNBUFFERED=1
variants="64,4,4,4 64,8,4,4 64,4,3,8 64,8,3,8 64,4,2,8 64,4,2,12 64,4,2,16 64,2,3,8 32,4,3,8 32,4,4,8 32,4,3,16 128,4,2,8"
for n in 4096 1024 16384; do
  timeout 150 python3 scripts/decode_rounds.py $n 1 5 --variants $variants 2>&1 | tee "$out/rounds-$n.txt" | grep -E "^\||Error"
done
timeout 60 python3 scripts/adapter_host.py 2>&1 | tee "$out/adapter-host.txt"
timeout 90 python3 scripts/attention_host_share.py gpt2 all 512 --profile > "$out/host-share-gpt2.txt" 2>&1
timeout 120 python3 scripts/attention_host_share.py llama2-7b 8 512 --profile > "$out/host-share-llama8.txt" 2>&1
grep -E "^\|" "$out"/host-share-*.txt
