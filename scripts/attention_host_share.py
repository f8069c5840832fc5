"""How much of a warm eager decode step is the attention call's host time: sdpa vs flashpatch, interleaved.

Usage (GPU): python3 scripts/attention_host_share.py [PRESET] [LAYERS] [CONTEXT]   (default gpt2, all layers, 512)
Times single-token forwards over a DynamicCache (greedy, no host sync inside a round), and wraps each
implementation's attention function to sum the host time its calls take (launches included, no sync).
"""

import cProfile
import gc
import os
import pstats
import statistics
import sys
import time

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a smoke run in Triton's interpreter
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
from transformers import DynamicCache

import attention_timing
from flashpatch.presets import build_model

name = sys.argv[1] if len(sys.argv) > 1 else "gpt2"
layers = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2] != "all" else None
context = int(sys.argv[3]) if len(sys.argv) > 3 else 512
steps, rounds = (64, 7) if DEVICE == "cuda" else (4, 1)
model = build_model(name, layers=layers, dtype=torch.bfloat16, device=DEVICE, max_positions=context + 2 * steps)
prompt = torch.randint(0, model.config.vocab_size, (1, context), device=DEVICE)
spent: list = []  # host seconds of each attention call in the current round
sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)


def use(impl):
    attention_timing.use(model, impl, spent)


@torch.no_grad()
def decode_round():
    cache = DynamicCache(config=model.config)
    logits = model(prompt, past_key_values=cache, use_cache=True).logits
    token = logits[:, -1:].argmax(-1)
    mask = torch.ones(1, context + steps, device=DEVICE, dtype=torch.long)
    sync()
    spent.clear()
    start = time.perf_counter()
    for i in range(steps):
        logits = model(token, past_key_values=cache, attention_mask=mask[:, :context + i + 1], use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
    sync()
    total = time.perf_counter() - start
    return total / steps * 1e3, sum(spent) / max(len(spent), 1) * 1e6, len(spent) / steps


impls = ("sdpa", "flashpatch")
for impl in impls:
    use(impl)
    decode_round()  # warm-up
results = {impl: [] for impl in impls}
for _ in range(rounds):
    for impl in impls:
        use(impl)
        results[impl].append(decode_round())
gc_runs = {}
for impl in impls:  # Python's cyclic GC: collections per step (each generation), with the op's allocations
    use(impl)
    before = [g["collections"] for g in gc.get_stats()]
    decode_round()
    gc_runs[impl] = [(g["collections"] - b) / steps for g, b in zip(gc.get_stats(), before)]
profiles = {}
if "--profile" in sys.argv:
    for impl in impls:
        use(impl)
        profiler = cProfile.Profile()
        profiler.enable()
        decode_round()
        profiler.disable()
        profiles[impl] = profiler
attention_timing.restore()
for impl, profiler in profiles.items():
    print(f"\n{impl}: top functions by own time, one round of {steps} steps")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(18)

print(f"{name}, {model.config.num_hidden_layers} layers, context {context}, bf16, batch 1, {steps} single-token "
      f"forwards per round, {rounds} rounds interleaved (medians)")
print("| impl | ms per step | attention host us per call | calls per step | attention host ms per step | "
      "rest of the step ms |")
print("|---|---|---|---|---|---|")
for impl in impls:
    print(f"gc collections per step ({impl}, generations 0/1/2):", " ".join(f"{c:.2f}" for c in gc_runs[impl]))
for impl in impls:
    step = statistics.median(r[0] for r in results[impl])
    per_call = statistics.median(r[1] for r in results[impl])
    calls = results[impl][0][2]
    print(f"| {impl} | {step:.2f} | {per_call:.1f} | {calls:.0f} | {per_call * calls / 1e3:.2f} | "
          f"{step - per_call * calls / 1e3:.2f} |")
