#!/usr/bin/env bash
# On a machine of two or more GPUs: fine-tuning under accelerate launch (DDP, then FSDP) against one GPU, then the
# Llama-2-7B shape sharded over both GPUs (verify + bench).
# Usage: scripts/gpu_multi.sh WIKITEXT_FILE OUT_DIR
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # multicast stays off
text=$1; out=$2
args=(--model smollm2 --text "$text" --context 1024 --batch-size 4 --max-steps 50 --seed 0)
CUDA_VISIBLE_DEVICES=0 python3 examples/finetune_llama.py "${args[@]}" --json "$out/single.json" | tail -2
for mode in ddp fsdp; do
  accelerate launch --config_file "examples/accelerate/$mode.yaml" examples/finetune_llama.py "${args[@]}" \
    --batch-size 2 --json "$out/$mode.json" 2>&1 | tail -3
done
# The Llama-2-7B shape spread over both GPUs by accelerate (device_map="auto"): parity and speed before/after.
flashpatch verify llama2-7b --device-map auto --text "$text" --max-tokens 32768 --dtype bf16 \
  --json "$out/verify-sharded.json" | tail -4
flashpatch bench llama2-7b --device-map auto --contexts 512,2048,8192 --new-tokens 128 \
  --json "$out/bench-sharded.json" --plot "$out/bench-sharded.png" | tail -12
