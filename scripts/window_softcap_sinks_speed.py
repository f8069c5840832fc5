"""Forward speed of sliding-window, softcapped and sink attention: flashpatch vs FlexAttention, SDPA where it can.

The shapes of the models that need them (bf16, random inputs, causal, GQA as the model has it):
  * Mistral-7B: 32/8 heads, head dim 128, sliding window 4096 (flash-attn's window (4095, 0)).
  * Gemma-2-9B: 16/8 heads, head dim 256, scores softcapped at 50; its local layers also slide a 4096 window.
  * gpt-oss-20b: 64/8 heads, head dim 64, one sink logit per head; its sliding layers have a 128 window.
Beside flashpatch.attention: FlexAttention compiled (the window as a block mask, the softcap as a score_mod, the
sinks applied to Flex's output through its lse: out * sigmoid(lse - sink), which is exact), SDPA (default backend
choice) with the window as a dense boolean mask, and flashpatch without the feature (plain causal: what the
feature costs). Each cell first checks flashpatch against Flex (max |diff|, printed), then times both with
triton.testing.do_bench. TFLOPS count 4 * B * Hq * D per visible (query, key) pair.

Usage (GPU): PYTHONUNBUFFERED=1 python3 scripts/window_softcap_sinks_speed.py [--lengths 4096,8192] [--cases sinks]
    [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
import triton

import flashpatch

# name, Hq, Hkv, head dim, window (keys a query sees, itself included; None: all), softcap, sinks
CASES = [
    ("mistral-7b window 4096", 32, 8, 128, 4096, None, False),
    ("gemma-2-9b softcap 50", 16, 8, 256, None, 50.0, False),
    ("gemma-2-9b local: window 4096 + softcap", 16, 8, 256, 4096, 50.0, False),
    ("gpt-oss-20b sinks", 64, 8, 64, None, None, True),
    ("gpt-oss-20b sliding: window 128 + sinks", 64, 8, 64, 128, None, True),
]


def visible_pairs(n: int, window: int | None) -> int:
    """(query, key) pairs a causal self-attention of n tokens computes, window keys at most per query."""
    if window is None or window >= n:
        return n * (n + 1) // 2
    return window * (window + 1) // 2 + (n - window) * window


def flex_callable(q, k, v, window, softcap, sinks):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)

    def keep(b, h, qi, ki):
        visible = qi >= ki
        return visible & (qi - ki < window) if window is not None else visible

    mask = create_block_mask(keep, None, None, q.shape[2], k.shape[2], device=q.device)
    score_mod = None
    if softcap:
        def score_mod(score, b, h, qi, ki):
            return softcap * torch.tanh(score / softcap)

    def run():
        if sinks is None:
            return compiled(q, k, v, block_mask=mask, score_mod=score_mod, enable_gqa=True)
        out, lse = compiled(q, k, v, block_mask=mask, score_mod=score_mod, enable_gqa=True, return_lse=True)
        # The sink joins the softmax's denominator only: out * Z / (Z + e^sink) = out * sigmoid(lse - sink).
        return out * torch.sigmoid(lse - sinks.float()[None, :, None]).unsqueeze(-1).to(out.dtype)

    return run


def sdpa_window_callable(q, k, v, window):
    n = q.shape[2]
    idx = torch.arange(n, device=q.device)
    mask = (idx[:, None] >= idx[None, :]) & (idx[:, None] - idx[None, :] < window)
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def ms_of(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def served_by(sinks: bool, softcap, window) -> str:
    """The kernel and tile that served the last call kind with these features (flashpatch.kernels_used())."""
    wanted = {name for name, on in (("sinks", sinks), ("softcap", softcap), ("window", window)) if on}
    for used in reversed(flashpatch.kernels_used()):
        if set(used.get("features", ())) == wanted and used.get("causal"):
            return f"{used['kernel']} {used.get('tile', '')}".strip()
    return "?"


def run_case(name, heads_q, heads_k, head_dim, window, softcap, use_sinks, n, batch, log):
    torch.manual_seed(n + head_dim)
    q = torch.randn(batch, heads_q, n, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, heads_k, n, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(batch, heads_k, n, head_dim, device="cuda", dtype=torch.bfloat16)
    sinks = torch.randn(heads_q, device="cuda") * 2 if use_sinks else None
    kw = dict(causal=True, softcap=softcap, sinks=sinks, window=(window - 1, 0) if window else None)
    ours = lambda: flashpatch.attention(q, k, v, **kw)  # noqa: E731
    flops = 4.0 * batch * heads_q * head_dim * visible_pairs(n, window)
    row = {"case": name, "N": n, "batch": batch, "flashpatch_ms": ms_of(ours)}
    row["served_by"] = served_by(sinks is not None, softcap, window)
    row["plain_causal_ms"] = ms_of(lambda: flashpatch.attention(q, k, v, causal=True))
    row["plain_served_by"] = served_by(False, None, None)
    row.update(flex_ms=None, max_abs_diff_vs_flex=None)
    try:
        flex = flex_callable(q, k, v, window, softcap, sinks)
        row["max_abs_diff_vs_flex"] = (ours().float() - flex().float()).abs().max().item()
        row["flex_ms"] = ms_of(flex)
    except Exception as exc:  # a shape Flex can't compile (shared memory at head dim 256, say): recorded, run goes on
        log(f"  flex: {type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}")
    if window is not None and softcap is None and sinks is None:
        try:
            row["sdpa_dense_mask_ms"] = ms_of(sdpa_window_callable(q, k, v, window))
        except RuntimeError as exc:  # out of memory for the dense mask, or no backend takes it
            row["sdpa_dense_mask_ms"] = None
            log(f"  sdpa with a dense mask: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
    row["flashpatch_tflops"] = flops / (row["flashpatch_ms"] * 1e-3) / 1e12
    row["flex_tflops"] = row["flex_ms"] and flops / (row["flex_ms"] * 1e-3) / 1e12
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="4096,16384")
    parser.add_argument("--tokens", type=int, default=32768, help="batch = tokens // N (at least 1)")
    parser.add_argument("--cases", default="", help="only the cases whose name contains this text")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    start = time.time()

    def log(msg):
        print(f"[{time.time() - start:6.1f}s] {msg}", flush=True)

    log(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        for case in (c for c in CASES if args.cases in c[0]):
            row = run_case(*case, n, max(1, args.tokens // n), log)
            rows.append(row)
            log(f"{row['case']} N={n}: flashpatch {row['flashpatch_ms']:.3f} ms ({row['served_by']}), flex "
                f"{row['flex_ms']} ms, plain causal {row['plain_causal_ms']:.3f} ms ({row['plain_served_by']}), "
                f"max|diff| vs flex {row['max_abs_diff_vs_flex']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"\n{'case':42} {'N':>6} {'ours':>7} {'Flex':>7} {'ratio':>6} {'TFLOPS':>7} {'sdpa':>7} {'plain':>7}")
    def cell(ms):
        return "-" if ms is None else f"{ms:.3f}"

    for r in rows:
        ratio = "-" if r["flex_ms"] is None else f"{r['flex_ms'] / r['flashpatch_ms']:.2f}"
        print(f"{r['case'][:42]:42} {r['N']:>6} {cell(r['flashpatch_ms']):>7} {cell(r['flex_ms']):>7} {ratio:>6} "
              f"{r['flashpatch_tflops']:7.0f} {cell(r.get('sdpa_dense_mask_ms')):>7} {cell(r['plain_causal_ms']):>7}")


if __name__ == "__main__":
    main()
