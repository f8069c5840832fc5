"""Where warm dynamic-cache generation spends host time: eager vs sdpa vs flashpatch, interleaved in one process.

Usage (GPU): python3 scripts/decode_host_profile.py [LAYERS] [CONTEXT]   (Llama-2-7B shape, bf16, batch 1)
Prints ms per decode step for each implementation (median of interleaved repeats), the CUDA kernels launched
per step, and flashpatch's top Python functions by own time (cProfile).
"""

import cProfile
import pstats
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import flashpatch
from flashpatch.presets import build_model

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 8
context = int(sys.argv[2]) if len(sys.argv) > 2 else 512
new_tokens = 64
model = build_model("llama2-7b", layers=layers, dtype=torch.bfloat16, device="cuda", max_positions=context + 128)
prompt = torch.randint(0, 32000, (1, context), device="cuda")
gen = dict(attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=0)


def generate(tokens):
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, **gen)


def step_ms():
    """Decode time per token: a long generation minus a one-token one (prefill), synchronised."""
    times = []
    for tokens in (1, new_tokens):
        torch.cuda.synchronize()
        t = time.perf_counter()
        generate(tokens)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return (times[1] - times[0]) / (new_tokens - 1) * 1e3


def use(impl):
    flashpatch.unapply(model)
    if impl == "flashpatch":
        flashpatch.apply(model, fallback="error")
    else:
        model.set_attn_implementation(impl)


impls = ("eager", "sdpa", "flashpatch")
for impl in impls:  # warm-up: compiles, cuDNN plans, autotune
    use(impl)
    generate(new_tokens)
results = {impl: [] for impl in impls}
for _ in range(5):
    for impl in impls:
        use(impl)
        results[impl].append(step_ms())

launches = {}
for impl in impls:
    use(impl)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        generate(new_tokens)
        torch.cuda.synchronize()
    kernels = sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
    launches[impl] = kernels / new_tokens

use("flashpatch")
profiler = cProfile.Profile()
profiler.enable()
generate(new_tokens)
profiler.disable()
print(f"flashpatch: top functions by own time over {new_tokens} tokens x {layers} layers")
pstats.Stats(profiler).sort_stats("tottime").print_stats(25)

print(f"\nLlama-2-7B shape, {layers} layers, context {context}, bf16, batch 1, {new_tokens} new tokens (warm)")
print("| impl | ms per decode step (median of 5) | all 5 | CUDA kernels per step |")
print("|---|---|---|---|")
for impl in impls:
    runs = " ".join(f"{t:.2f}" for t in results[impl])
    print(f"| {impl} | {statistics.median(results[impl]):.2f} | {runs} | {launches[impl]:.0f} |")
