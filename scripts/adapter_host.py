"""Host time per decode call through transformers' attention entry points: our adapter vs transformers' sdpa one.

Usage (GPU): python3 scripts/adapter_host.py [--profile]   (GPT-2 block shapes: 12 heads, head dim 64, 600 keys)
Each line: microseconds of host time per call (no sync), median of 5 timings of 2000 calls.
"""

import cProfile
import pstats
import statistics
import sys
import time

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import flashpatch
from flashpatch import adapter
from flashpatch.presets import build_model

model = build_model("gpt2", layers=1, dtype=torch.bfloat16, device="cuda")
module = model.transformer.h[0].attn
q = torch.randn(1, 12, 1, 64, device="cuda", dtype=torch.bfloat16)
k, v = (torch.randn(1, 12, 600, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))


def host_us(fn, n=2000):
    for _ in range(100):
        fn()
    runs = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - start) / n * 1e6)
    torch.cuda.synchronize()
    return statistics.median(runs)


cases = {
    "sdpa_attention_forward (transformers)": lambda: sdpa_attention_forward(module, q, k, v, None, is_causal=True),
    "F.scaled_dot_product_attention": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
}
flashpatch.apply(model, fallback="error")
cases.update({
    "flashpatch adapter": lambda: adapter.flashpatch_attention_forward(module, q, k, v, None),
    "flashpatch.attention": lambda: flashpatch.attention(q, k, v, causal=True, scale=0.125),
    "adapter._unsupported_feature": lambda: adapter._unsupported_feature(None, {}),
    "torch.empty (cuda)": lambda: torch.empty((1, 1, 12, 64), device="cuda", dtype=torch.bfloat16),
})
with torch.no_grad():
    for name, fn in cases.items():
        print(f"{name:40s} {host_us(fn):8.1f} us/call (host)", flush=True)
    if "--profile" in sys.argv:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(5000):
            adapter.flashpatch_attention_forward(module, q, k, v, None)
        profiler.disable()
        torch.cuda.synchronize()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(22)
