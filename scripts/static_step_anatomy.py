"""Where a static-cache decode step's time goes under transformers' compiled generate.

For sdpa and flashpatch on the Llama-2-7B shape (random weights, bf16, batch 1), in one process, each compiled
afresh: transformers' own compiled generate's end-to-end tokens/s (median of 3, after warm-up), and from a profile
of one generation, GPU kernel time per generated token by kernel family and its share of the wall time. GPU time
per token is the floor a faster host loop could reach; the rest of the wall time is the host (generate's loop,
the compiled step's start) with the GPU idle.

Usage: python3 scripts/static_step_anatomy.py [--layers N] [--context 512] [--new-tokens 128]
"""

import argparse
import statistics
import time
from collections import defaultdict

import torch
from torch._dynamo.utils import counters
from torch.profiler import ProfilerActivity, profile

from flashpatch.bench.switch import implementation_switcher
from flashpatch.presets import build_model

parser = argparse.ArgumentParser()
parser.add_argument("--layers", type=int, default=None)
parser.add_argument("--context", type=int, default=512)
parser.add_argument("--new-tokens", type=int, default=128)
args = parser.parse_args()

model = build_model("llama2-7b", layers=args.layers, dtype=torch.bfloat16, device="cuda",
                    max_positions=args.context + args.new_tokens)
prompt = torch.randint(0, model.config.vocab_size, (1, args.context), device="cuda")
gen = dict(attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=0, cache_implementation="static",
           max_cache_len=args.context + args.new_tokens)


def generate(new_tokens):
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **gen)
    torch.cuda.synchronize()
    return out


def family(name: str) -> str:
    lowered = name.lower()
    if any(s in lowered for s in ("gemm", "gemv", "nvjet", "cutlass", "sm90_xmma", "cublas", "splitk")):
        return "matmul"
    if any(s in lowered for s in ("flash", "fmha", "attention", "cudnn", "sdpa")):
        return "attention"
    return "other"


def profiled(new_tokens):
    """(GPU ms by kernel family, wall s, top kernels) of one generation under the profiler."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        generate(new_tokens)
        wall = time.perf_counter() - start
    by_family = defaultdict(float)
    for event in prof.key_averages():  # kernels only: "## Call CompiledFxGraph ..." ranges re-count theirs
        if event.self_device_time_total > 0 and not event.key.startswith("##"):
            by_family[family(event.key)] += event.self_device_time_total / 1e3
    top = sorted(((e.self_device_time_total, e.key) for e in prof.key_averages() if not e.key.startswith("##")),
                 reverse=True)[:6]
    return by_family, wall, top


def anatomy(name):
    torch._dynamo.reset()
    if hasattr(model, "_compiled_call"):
        del model._compiled_call
    counters.clear()
    start = time.perf_counter()
    generate(8)  # compile (prefill runs eagerly; the decode step is compiled and captured)
    compile_s = time.perf_counter() - start
    generate(args.new_tokens)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        generate(args.new_tokens)
        times.append(time.perf_counter() - start)
    tok_s = args.new_tokens / statistics.median(times)
    (first, wall_first, _), (many, wall_many, top) = profiled(1), profiled(33)  # the difference: 32 decode steps
    by_family = {k: (many[k] - first.get(k, 0.0)) / 32 for k in many}
    gpu_ms = sum(by_family.values())
    wall_ms = (wall_many - wall_first) * 1e3 / 32
    print(f"\n[{name}] compile {compile_s:.1f} s; graph breaks {sum(counters['graph_break'].values())}; "
          f"cudagraph skips {dict(counters['inductor'].get('cudagraph_skips', {}) or {}) or 0}", flush=True)
    print(f"[{name}] top kernels (self GPU ms, prefill and 32 decode steps): "
          + "; ".join(f"{key[:60]} {us / 1e3:.1f}" for us, key in top), flush=True)
    return dict(impl=name, tok_s=tok_s, ms_token=1e3 / tok_s, profiled_ms_token=wall_ms, gpu_ms_token=gpu_ms,
                gpu_busy=gpu_ms / wall_ms, **{f"{k}_ms": v for k, v in sorted(by_family.items())})


rows = []
with implementation_switcher(model, ["sdpa"]) as (switch, names, _):
    for name in names:
        switch(name)
        rows.append(anatomy(name))

print(f"\nLlama-2-7B shape, {model.config.num_hidden_layers} layers, context {args.context}, "
      f"{args.new_tokens} new tokens, static cache + transformers' compiled generate, bf16, batch 1")
keys = list(dict.fromkeys(k for row in rows for k in row))
print("| " + " | ".join(keys) + " |")
print("|" + "---|" * len(keys))
for row in rows:
    print("| " + " | ".join(f"{row.get(k, 0):.2f}" if isinstance(row.get(k, 0), float) else str(row.get(k))
                            for k in keys) + " |")
