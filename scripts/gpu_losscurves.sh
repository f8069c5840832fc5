#!/usr/bin/env bash
# Issue 6's loss curves on one GPU: each fine-tuning example patched and unpatched, same seed and data.
# Usage: scripts/gpu_losscurves.sh GGUF_FILE WIKITEXT_FILE OUT_DIR [STEPS]
set -u
gguf=$1; text=$2; out=$3; steps=${4:-200}
for fp in flashpatch no-flashpatch; do
  python3 examples/finetune_llama.py --model "$gguf" --text "$text" --context 1024 --batch-size 8 \
    --max-steps "$steps" --lr 2e-5 --$fp --json "$out/llama-$fp.json" 2>&1 | grep -E "final loss|Error|error" 
done
for fp in flashpatch no-flashpatch; do
  python3 examples/finetune_gpt2.py --text "$text" --context 1024 --batch-size 8 --max-steps "$steps" \
    --lr 3e-4 --$fp --json "$out/gpt2-$fp.json" 2>&1 | grep -E "final loss|Error|error"
done
python3 examples/plot_losses.py "$out"/llama-*.json --out "$out/losses-llama.png" \
  --title "SmolLM2-135M fine-tuned on WikiText-2, bf16, 8x1024"
python3 examples/plot_losses.py "$out"/gpt2-*.json --out "$out/losses-gpt2.png" \
  --title "GPT-2 124M (random init) on WikiText-2, bf16, 8x1024"
