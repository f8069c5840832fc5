"""Host time of one attention call through transformers' entry points: flashpatch's adapter vs transformers' sdpa.

Two calls a generation repeats in every layer: a decode step (GPT-2 block: 12 heads, head dim 64, 1 query against
600 keys) and a 512-token prefill (Llama-2-7B block: 32 heads, head dim 128). Each line: microseconds of host time
per call (no sync inside the timing), median of 5 timings of N calls, after a warm-up that leaves flashpatch's plan
for the call's kind in place. Only public entry points are used, so the script times any checkout.

Usage (GPU): python3 scripts/attention_host_time.py [--calls 2000]
"""

import argparse
import statistics
import time

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import flashpatch
from flashpatch.adapter import flashpatch_attention_forward
from flashpatch.presets import build_model


def host_us(fn, calls: int) -> float:
    for _ in range(100):
        fn()
    runs = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    torch.cuda.synchronize()
    return statistics.median(runs)


def block(preset: str, heads: int, head_dim: int, seq_q: int, seq_k: int):
    model = build_model(preset, layers=1, dtype=torch.bfloat16, device="cuda")
    attention = next(m for m in model.modules() if type(m).__name__.endswith("Attention"))
    q = torch.randn(1, seq_q, heads, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(1, seq_k, heads, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
            for _ in range(2))
    flashpatch.apply(model, fallback="error")
    return attention, q, k, v


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, flashpatch at {flashpatch.__file__}, {torch.cuda.get_device_name()}")
    print("| call | transformers sdpa us | flashpatch adapter us | ratio |\n|---|---|---|---|")
    for name, shape in (("decode, GPT-2 block, 600 keys", ("gpt2", 12, 64, 1, 600)),
                        ("prefill, Llama-2-7B block, 512 tokens", ("llama2-7b", 32, 128, 512, 512))):
        module, q, k, v = block(*shape)
        with torch.no_grad():
            sdpa = host_us(lambda: sdpa_attention_forward(module, q, k, v, None, is_causal=True), args.calls)
            ours = host_us(lambda: flashpatch_attention_forward(module, q, k, v, None), args.calls)
        print(f"| {name} | {sdpa:.1f} | {ours:.1f} | {ours / sdpa:.2f} |", flush=True)


if __name__ == "__main__":
    main()
