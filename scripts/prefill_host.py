"""Why a warm 512-token prefill (time to first token) takes longer with flashpatch than with sdpa on the
Llama-2-7B shape: wall time per forward, host time per attention call, and the host syncs and copies the
profiler sees, sdpa vs flashpatch.

Usage (GPU): python3 scripts/prefill_host.py [LAYERS] [CONTEXT]   (default 8 layers, 512 tokens)
"""

import statistics
import sys
import time

import torch

import attention_timing
from flashpatch.presets import build_model

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 8
context = int(sys.argv[2]) if len(sys.argv) > 2 else 512
model = build_model("llama2-7b", layers=layers, dtype=torch.bfloat16, device="cuda", max_positions=context + 8)
prompt = torch.randint(0, model.config.vocab_size, (1, context), device="cuda")
mask = torch.ones_like(prompt)
spent: list = []  # host seconds of each attention call in the current forward


def use(impl):
    attention_timing.use(model, impl, spent)


@torch.no_grad()
def forward():
    spent.clear()
    torch.cuda.synchronize()
    start = time.perf_counter()
    model(prompt, attention_mask=mask, use_cache=True)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3, statistics.median(spent) * 1e6


impls = ("sdpa", "flashpatch")
for impl in impls:
    use(impl)
    for _ in range(3):
        forward()
results = {impl: [] for impl in impls}
for _ in range(7):
    for impl in impls:
        use(impl)
        results[impl].append(forward())
print(f"llama2-7b shape, {layers} layers, prompt {context}, bf16, warm forwards (median of 7, interleaved)")
print("| impl | ms per forward | attention host us per call |\n|---|---|---|")
for impl in impls:
    print(f"| {impl} | {statistics.median(r[0] for r in results[impl]):.2f} | "
          f"{statistics.median(r[1] for r in results[impl]):.1f} |")
for impl in impls:
    use(impl)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        forward()
    events = prof.key_averages()
    print(f"\n{impl}: syncs and copies in one forward")
    for e in events:
        if any(s in e.key for s in ("Synchronize", "Memcpy", "item", "is_nonzero", "_local_scalar")):
            print(f"  {e.key}: {e.count} calls, {e.cpu_time_total:.0f} us CPU")
    print(f"{impl}: top CUDA kernels")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:6]:
        print(f"  {e.key[:80]}: {e.count} calls, {e.device_time_total:.0f} us")
attention_timing.restore()
