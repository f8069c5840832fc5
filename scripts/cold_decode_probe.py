"""Why is decode slower on unseen lengths? Per-step times and launch-cache misses over cold generate calls (GPT-2)."""

import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

import flashpatch
from flashpatch.kernels import decode, forward
from flashpatch.presets import build_model

model = build_model("gpt2", dtype=torch.bfloat16, device="cuda", max_positions=4096)
flashpatch.apply(model, fallback="error")


class Clock(LogitsProcessor):
    def __init__(self):
        self.t = []

    def __call__(self, ids, scores):
        torch.cuda.synchronize()
        self.t.append(time.perf_counter())
        return scores


def launches():
    return {name: len(l.compiled) for name, l in (("decode", decode._launch_decode), ("fwd", forward._launch_forward),
                                                  ("combine", forward._launch_combine))}


for length in (300, 2048, 1919, 1790, 2048, 2048):
    prompt = torch.randint(0, 50000, (1, length), device="cuda")
    clock = Clock()
    before = launches()
    with torch.no_grad():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=128, min_new_tokens=128,
                       do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([clock]))
    steps = [b - a for a, b in zip(clock.t, clock.t[1:])]
    slow = [(i, round(s * 1e3)) for i, s in enumerate(steps) if s > 3 * sorted(steps)[len(steps) // 2]]
    print(f"len {length}: median step {sorted(steps)[len(steps) // 2] * 1e3:.1f} ms, total {sum(steps):.2f} s, "
          f"slow steps {slow[:12]}, new launch-cache entries {({k: launches()[k] - v for k, v in before.items()})}",
          flush=True)
