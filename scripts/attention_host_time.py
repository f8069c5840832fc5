"""Host time of one attention call through transformers' entry points: flashpatch's adapter vs transformers' sdpa.

Two calls a generation repeats in every layer: a decode step (GPT-2 block: 12 heads, head dim 64, 1 query against
600 keys) and a 512-token prefill (Llama-2-7B block: 32 heads, head dim 128). Each line: microseconds of host time
per call (no sync inside the timing), median of 5 timings of N calls, after a warm-up that leaves flashpatch's plan
for the call's kind in place. Only public entry points are used, so the script times any checkout.

Usage (GPU): python3 scripts/attention_host_time.py [--calls 2000]

The last column names what served the call after the warm-up: the kind of plan the call's kind left (`decode`,
`portable`: launched through flashpatch's cached launcher; `tma`, `gluon-sm90`: through Triton's own launcher, tensor
descriptors built per call), or "no plan" where every call takes the general route (1dcab52 with a TMA tile); the
prefill row adds the autotuner's choice for its length bucket, which the disk cache (~/.cache/flashpatch, or
FLASHPATCH_CACHE_DIR) may have brought from an earlier process, and the FLASHPATCH_* switches set.

--python-only (any machine, GPU-free): the Python part of both calls alone. The kernels run in Triton's interpreter
once per call to make its plan, then that plan's `run` is replaced by a stub returning a preallocated output, so
what is timed is the adapter, validation and plan lookup (median of 7 timings of 20,000 calls). The decode call is
the GPU row's (float32 on the CPU); the prefill call is a Llama-2-7B attention block (32 heads, head dim 128,
vocabulary and MLP shrunk: the attention module is the same) with 128 bfloat16 tokens, causal, no mask, in the
projections' [B, S, H, D] layout: like the GPU row's 512 tokens it has more query rows than the decode kernel takes
(SHORT_Q_BLOCK_M), so it is a prefill plan keyed by its key length, looked up on every call before any validation.
What the stub hides is which plan the GPU call gets (on an sm90 GPU the autotuner's choice: a pointer-kernel plan
launched through flashpatch's cached launcher, or a TMA / Gluon one launched through Triton's own) and that launch.
It reaches the plans through `flashpatch.kernels.plans.PLANS`, or `flashpatch.ops._PLANS` in older checkouts.
"""

import argparse
import os
import statistics
import sys
import time

if "--python-only" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton's language is imported

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


def held_plans() -> dict:
    try:
        from flashpatch.kernels.plans import PLANS
        return PLANS.plans
    except ImportError:
        from flashpatch.ops import _PLANS
        return _PLANS


def python_part_us(preset: str, heads: int, head_dim: int, seq_q: int, seq_k: int, dtype, **overrides) -> float:
    model = build_model(preset, layers=1, dtype=dtype, device="cpu", **overrides)
    attention = next(m for m in model.modules() if type(m).__name__.endswith("Attention"))
    q = torch.randn(1, seq_q, heads, head_dim, dtype=dtype).transpose(1, 2)
    k, v = (torch.randn(1, seq_k, heads, head_dim, dtype=dtype).transpose(1, 2) for _ in range(2))
    flashpatch.apply(model, fallback="error")
    with torch.no_grad():
        before = set(map(id, held_plans().values()))
        flashpatch_attention_forward(attention, q, k, v, None)  # makes the plan, in the interpreter
        made = [plan for plan in held_plans().values() if id(plan) not in before]
        assert len(made) == 1, f"the first call made {len(made)} plans"
        out = torch.empty(1, seq_q, heads, head_dim, dtype=dtype)
        type(made[0]).run = lambda self, *args, **kwargs: (out, None)
        runs = []
        for _ in range(7):
            start = time.perf_counter()
            for _ in range(20000):
                flashpatch_attention_forward(attention, q, k, v, None)
            runs.append((time.perf_counter() - start) / 20000 * 1e6)
    return statistics.median(runs)


def served_by(made: list) -> str:
    """What the plans a row's calls left say of the route (older checkouts' plans have no `kernel` name)."""
    if not made:
        return "no plan: the general route every call"
    return ", ".join(getattr(plan, "kernel", type(plan).__name__) for plan in made)


def tuned(seq: int) -> str:
    """The autotuner's choices held for this length bucket (loaded from disk or timed in this process)."""
    from flashpatch.kernels import AUTOTUNER

    bucket = f"-q{1 << (seq - 1).bit_length()}-k{1 << (seq - 1).bit_length()}"
    return "; ".join(f"{key}: {cfg}" for family in AUTOTUNER.choices.values() for key, cfg in family.items()
                     if bucket in key) or "none (tile table's row)"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--python-only", action="store_true", help="the calls' Python part, on a CPU")
    args = parser.parse_args()
    if args.python_only:
        decode = python_part_us("gpt2", 12, 64, 1, 600, torch.float32)
        prefill = python_part_us("llama2-7b", 32, 128, 128, 128, torch.bfloat16, vocab_size=256,
                                 intermediate_size=256)
        print(f"flashpatch at {flashpatch.__file__}: Python part, decode call {decode:.2f} us, "
              f"prefill call {prefill:.2f} us")
        return
    print(f"torch {torch.__version__}, flashpatch at {flashpatch.__file__}, {torch.cuda.get_device_name()}")
    switches = {name: value for name, value in os.environ.items() if name.startswith("FLASHPATCH_")}
    print(f"FLASHPATCH_* switches: {switches or 'none set'}")
    print("| call | transformers sdpa us | flashpatch adapter us | ratio | served by |\n|---|---|---|---|---|")
    for name, shape in (("decode, GPT-2 block, 600 keys", ("gpt2", 12, 64, 1, 600)),
                        ("prefill, Llama-2-7B block, 512 tokens", ("llama2-7b", 32, 128, 512, 512))):
        module, q, k, v = block(*shape)
        with torch.no_grad():
            sdpa = host_us(lambda: sdpa_attention_forward(module, q, k, v, None, is_causal=True), args.calls)
            before = set(map(id, held_plans().values()))
            ours = host_us(lambda: flashpatch_attention_forward(module, q, k, v, None), args.calls)
        route = served_by([plan for plan in held_plans().values() if id(plan) not in before])
        if shape[3] > 16:
            route += f" (autotune: {tuned(shape[3])})"
        print(f"| {name} | {sdpa:.1f} | {ours:.1f} | {ours / sdpa:.2f} | {route} |", flush=True)


if __name__ == "__main__":
    main()
