"""Where a compiled static-cache decode step spends GPU time: sdpa vs flashpatch, same model, one process.

Usage: python scripts/profile_static_decode.py [LAYERS]   (Llama-2-7B shape, context 512, bf16)
"""

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import flashpatch
from flashpatch.presets import build_model

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 8
model = build_model("llama2-7b", layers=layers, dtype=torch.bfloat16, device="cuda", max_positions=1024)
prompt = torch.randint(0, 32000, (1, 512), device="cuda")
gen = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=64, min_new_tokens=64, do_sample=False,
           pad_token_id=0, cache_implementation="static", max_cache_len=640)


def run(label):
    with torch.no_grad():
        model.generate(prompt, **gen)  # compile
        model.generate(prompt, **gen)
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(prompt, **gen)
        torch.cuda.synchronize()
        print(f"{label}: {64 / (time.perf_counter() - t):.1f} tok/s end to end", flush=True)
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            model.generate(prompt, **gen)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=70), flush=True)


run("sdpa")
flashpatch.apply(model, fallback="error")
run("flashpatch")
