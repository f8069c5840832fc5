"""The Gluon sm90 forward (kernels/forward_sm90.py) on a Hopper GPU: is every candidate right, and how fast is it.

1. Checks every candidate config (causal and not; bf16, and fp16 for each head dim's default) against float64
   with FA2's rule (error <= 2 x torch's own same-dtype error + eps), on odd lengths, bottom-right causal with
   Sq < Sk and Sq > Sk (empty rows), GQA 32/8 and 8/1, the [B, S, H, D] projection layout; outputs are
   poisoned with NaN first and lse is compared with float64 logsumexp. Every case runs as its own launch, so a
   dynamic-schedule counter left non-zero by one launch shows as NaN rows in the next.
2. Checks the masks (key padding with a fully padded batch, seqused_k from 0 to Sk with causal aligned to it,
   packed segments; each alone and all three together) on d128's default and first dynamic config, all three
   on the other head dims' defaults, and head dims 80/96 (the 128-wide kernel over descriptors of the true
   width).
3. Times every candidate at batch 8 x 32 heads, bf16, N in 1K..16K, head dims 64/128/256, causal and not,
   beside SDPA forced to cuDNN and to FlashAttention-2, and flashpatch.attention (the current Triton kernel).
   TFLOPS = 4 * B * H * N^2 * D / t, half that for causal. The first two contenders of each cell are timed
   again at its end (a cell's first timings have come out low after a change of shape); the better is kept.
4. Times the masks' cost at d128 N = 4096 (an all-true key-padding mask, seqused_k = N, one segment).

A variant that fails to compile prints one line and is skipped. A launch that does not finish within
--hang-seconds prints which one, writes what was gathered so far and exits (a deadlocked kernel cannot be
interrupted otherwise); --skip LABELS leaves such a config out on the next run.

Usage (after `pip install --no-deps -e .`):
    PYTHONUNBUFFERED=1 python3 scripts/sm90_forward_probe.py --out $OUT/sm90_forward.json
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from flashpatch.kernels import forward_sm90
from flashpatch.kernels.forward_sm90 import (SM90_CONFIGS, Sm90Config, default_config, flash_attn_forward_sm90,
                                             sm90_eligible)
from flashpatch.reference import reference_attention, visibility_mask
from probe_support import STATE, log, make_qkv, poisoned_empty, save, watchdog

EPS = {torch.float16: 1e-4, torch.bfloat16: 1e-3}  # slack on FA2's 2x rule, as tests/helpers.py
# (batch, heads_q, heads_k, seq_q, seq_k, layout): ragged tails, one key, Sq < Sk and Sq > Sk, GQA, many tiles.
CHECK_CASES = [(2, 4, 4, 1000, 1000, "bhsd"), (1, 2, 2, 1, 1, "bhsd"), (1, 2, 1, 17, 17, "bhsd"),
               (1, 2, 2, 255, 255, "bshd"), (2, 4, 2, 77, 333, "bshd"), (1, 2, 2, 300, 100, "bhsd"),
               (2, 32, 8, 640, 640, "bshd"), (2, 8, 1, 200, 513, "bshd"), (1, 4, 4, 2048, 2048, "bshd")]
BENCH_LENGTHS = (1024, 2048, 4096, 8192, 16384)
BATCH, HEADS = 8, 32

def expected_lse(q, k, causal, scale, **masks):
    group = q.shape[1] // k.shape[1]
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double().repeat_interleave(group, 1)) * scale
    mask = visibility_mask(q.shape[2], k.shape[2], causal=causal, device=q.device,
                           key_padding_mask=masks.get("key_padding_mask"), seqused_k=masks.get("seqused_k"),
                           segment_ids=masks.get("segment_ids"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.logsumexp(scores, -1)


def make_masks(batch, seq_q, seq_k, kinds):
    """Key padding (batch 0 fully padded), seqused_k from Sk down to 0, packed segments (Sq == Sk)."""
    masks = {}
    if "kpm" in kinds:
        kpm = torch.rand(batch, seq_k, device="cuda") > 0.2
        kpm[0] = False
        masks["key_padding_mask"] = kpm
    if "seqused" in kinds:
        masks["seqused_k"] = torch.tensor([(seq_k * i) // max(batch - 1, 1) for i in range(batch)][::-1],
                                          device="cuda", dtype=torch.int32)
    if "seg" in kinds:
        seg = torch.zeros(batch, seq_q, dtype=torch.int32)
        for b in range(batch):
            for c in (torch.randperm(seq_q - 1)[:4] + 1).tolist():
                seg[b, c:] += 1
        masks["segment_ids"] = seg.cuda()
    return masks


def check_case(config, head_dim, case, causal, dtype, need_lse, hang_seconds, label, kinds=()):
    batch, heads_q, heads_k, seq_q, seq_k, layout = case
    q, k, v = make_qkv(batch, heads_q, heads_k, seq_q, seq_k, head_dim, dtype, layout)
    masks = make_masks(batch, seq_q, seq_k, kinds)
    scale = head_dim ** -0.5
    with watchdog(hang_seconds, f"check {label} causal={causal} {dtype} case={case} masks={kinds}"), \
            poisoned_empty():
        out, lse = flash_attn_forward_sm90(q, k, v, causal=causal, scale=scale, need_lse=need_lse, config=config,
                                           **masks)
    ref64 = reference_attention(q.double(), k.double(), v.double(), causal=causal, scale=scale, **masks)
    ref_same = reference_attention(q, k, v, causal=causal, scale=scale, **masks)
    row = {"case": case, "masks": list(kinds), "nan": bool(torch.isnan(out).any()),
           "layout_ok": bool(out.transpose(1, 2).is_contiguous())}
    row["err"] = (out.double() - ref64).abs().max().item()
    row["torch_err"] = (ref_same.double() - ref64).abs().max().item()
    row["bound"] = 2 * row["torch_err"] + EPS[dtype]
    ok = not row["nan"] and row["layout_ok"] and row["err"] <= row["bound"]
    if need_lse:
        want = expected_lse(q, k, causal, scale, **masks)
        finite = torch.isfinite(want)
        row["lse_pattern_ok"] = bool(torch.equal(torch.isfinite(lse), finite))
        row["lse_err"] = (lse.double()[finite] - want[finite]).abs().max().item() if finite.any() else 0.0
        row["empty_rows_zero"] = bool((out[~finite] == 0).all())
        top = want[finite].abs().max().item() if finite.any() else 0.0
        ok = ok and row["lse_pattern_ok"] and row["lse_err"] <= 2e-3 + 1e-3 * top and row["empty_rows_zero"]
    else:
        ok = ok and lse is None
    row["ok"] = bool(ok)
    return row


def variant_label(head_dim, config):
    return f"d{head_dim}:{config.label()}"


def config_from_label(label, head_dim):
    """The Sm90Config a `label()` names ("m192n64s3+persist+dyn+ob"): block rows give the consumer count, the flags
    the schedule; registers as SM90_CONFIGS sets them (160 a consumer thread with three consumers, else 240; a
    32-register producer at head dim 256)."""
    match = re.fullmatch(r"m(\d+)n(\d+)s(\d+)((?:\+\w+)*)", label)
    if match is None:
        raise SystemExit(f"--extra: {label!r} is not a config label such as m128n128s2+ov+pp")
    block_m, block_n, stages = map(int, match.groups()[:3])
    flags = set(filter(None, match.group(4).split("+")))
    unknown = flags - {"ov", "pp", "persist", "dyn", "ob", "ds", "nopin"}
    if unknown or block_m % forward_sm90.CONSUMER_ROWS:
        raise SystemExit(f"--extra: {label!r}: unknown flags {sorted(unknown)} or rows not a multiple of 64")
    consumers = block_m // forward_sm90.CONSUMER_ROWS
    return Sm90Config(block_n, stages, overlap="ov" in flags, pingpong="pp" in flags, persistent="persist" in flags,
                      dynamic="dyn" in flags, num_consumers=consumers, consumer_regs=160 if consumers == 3 else 240,
                      epilogue="o_tile" if "ob" in flags else "direct" if "ds" in flags else "q_tile",
                      pin_pv_wait="nopin" not in flags, producer_regs=32 if head_dim == 256 else 24)


def selected_configs(head_dims, only, skip, extra=()):
    picked = [(head_dim, config) for head_dim, config in extra if head_dim in head_dims]
    for head_dim in head_dims:
        for config in SM90_CONFIGS[head_dim]:
            label = config.label()
            if (only and label not in only and variant_label(head_dim, config) not in only) or label in skip \
                    or variant_label(head_dim, config) in skip:
                continue
            picked.append((head_dim, config))
    # Simplest schedule first, so a hang points at the feature that causes it.
    return sorted(picked, key=lambda hc: (hc[1].persistent, hc[1].dynamic, hc[1].num_consumers, hc[1].pingpong,
                                          hc[1].overlap))


def kernel_facts(config, head_dim, causal, dtype, need_lse):
    compiled = forward_sm90.COMPILED.get((config, head_dim, causal, dtype, need_lse))
    if compiled is None:
        return {}
    facts = {"n_regs": getattr(compiled, "n_regs", None), "n_spills": getattr(compiled, "n_spills", None),
             "shared": compiled.metadata.shared}
    try:  # spill loads/stores per iteration of each key loop (unmasked and masked blocks, per consumer)
        loops = forward_sm90.loop_census(compiled)
        facts["loop_spills"] = sorted({loop["spills"] for loop in loops}) if loops else None
    except Exception as e:  # the SASS census is a nicety: never let it stop a check
        facts["loop_spills"] = f"{type(e).__name__}"
    return facts


def run_checks(configs, hang_seconds):
    checks = STATE["results"].setdefault("checks", [])
    failed = set()
    for head_dim, config in configs:
        label = variant_label(head_dim, config)
        dtypes = (torch.bfloat16, torch.float16) if config == default_config(head_dim) else (torch.bfloat16,)
        for dtype in dtypes:
            for causal in (False, True):
                rows, error = [], None
                try:
                    for case in CHECK_CASES:
                        rows.append(check_case(config, head_dim, case, causal, dtype, True, hang_seconds, label))
                    if config == default_config(head_dim) and dtype == torch.bfloat16:  # and without lse
                        rows.append(check_case(config, head_dim, CHECK_CASES[4], causal, dtype, False, hang_seconds,
                                               label))
                except Exception as e:  # a compile error or a launch failure: one line, then the next variant
                    error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
                passed = error is None and all(r["ok"] for r in rows)
                if not passed:
                    failed.add(label)
                facts = kernel_facts(config, head_dim, causal, dtype, True)
                worst = max((r["err"] / r["bound"] for r in rows), default=float("nan"))
                log(f"check {label:32s} {'causal' if causal else 'full  '} {str(dtype)[6:]:8s} "
                    f"{'ok  ' if passed else 'FAIL'} {sum(r['ok'] for r in rows)}/{len(rows)} cases, "
                    f"worst err/bound {worst:.2f}, {facts}" + (f" ERROR {error}" if error else ""))
                for r in rows:
                    if not r["ok"]:
                        log(f"    failed case {r}")
                checks.append({"variant": label, "causal": causal, "dtype": str(dtype), "passed": passed,
                               "error": error, "cases": rows, **facts})
                save()
    return failed


FEATURE_KINDS = [("kpm",), ("seqused",), ("seg",), ("kpm", "seqused", "seg")]


def run_feature_checks(head_dims, failed, hang_seconds):
    """Each mask alone and all three together on d128's default and first dynamic config; all three together on
    the other head dims' defaults; head dims 80/96 on d128's default (each mask set is a compile of its own)."""
    checks = STATE["results"].setdefault("feature_checks", [])
    plans = []
    for head_dim in head_dims:
        if head_dim == 128:
            for config in [default_config(128)] + [c for c in SM90_CONFIGS[128] if c.dynamic][:1]:
                plans += [(128, config, kinds) for kinds in FEATURE_KINDS]
            plans += [(80, default_config(80), ()), (96, default_config(96), ())]
        else:
            plans.append((head_dim, default_config(head_dim), FEATURE_KINDS[-1]))
    for head_dim, config, kinds in plans:
        label = variant_label(head_dim, config)
        for causal in (False, True):
            cases = ([(3, 4, 2, 333, 333, "bshd"), (2, 8, 8, 1500, 1500, "bshd")] if "seg" in kinds else
                     [(3, 4, 2, 200, 517, "bshd"), (3, 8, 4, 1100, 1100, "bshd")])
            rows, error = [], None
            try:
                for case in cases:
                    rows.append(check_case(config, head_dim, case, causal, torch.bfloat16, True, hang_seconds,
                                           label, kinds))
            except Exception as e:
                error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
            passed = error is None and all(r["ok"] for r in rows)
            if not passed:
                failed.add(f"{label}+{'+'.join(kinds) or 'plain'}")
            worst = max((r["err"] / r["bound"] for r in rows), default=float("nan"))
            log(f"feature {label:40s} {'+'.join(kinds) or '-':16s} {'causal' if causal else 'full  '} "
                f"{'ok  ' if passed else 'FAIL'} {sum(r['ok'] for r in rows)}/{len(rows)} cases, worst err/bound "
                f"{worst:.2f}" + (f" ERROR {error}" if error else ""))
            for r in rows:
                if not r["ok"]:
                    log(f"    failed case {r}")
            checks.append({"variant": label, "masks": list(kinds), "causal": causal, "passed": passed,
                           "error": error, "cases": rows})
            save()


def tflops(head_dim, n, causal, ms):
    flops = 4 * BATCH * HEADS * n * n * head_dim * (0.5 if causal else 1.0)
    return flops / (ms * 1e-3) / 1e12


def bench(fn, hang_seconds, what):
    with watchdog(hang_seconds, what):
        fn()  # compile / autotune outside the timing
    with watchdog(max(hang_seconds, 120), what):
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _sdpa(backend, qkv, causal):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(*qkv, is_causal=causal)


def run_bench(configs, head_dims, failed, hang_seconds, budget, with_flashpatch):
    import flashpatch

    bench_rows = STATE["results"].setdefault("bench", [])
    for head_dim in head_dims:
        for causal in (False, True):
            for n in BENCH_LENGTHS:
                if time.time() - STATE["started"] > budget:
                    log(f"time budget of {budget} s spent: stopping before d{head_dim} causal={causal} N={n}")
                    return
                q, k, v = make_qkv(BATCH, HEADS, HEADS, n, n, head_dim, torch.bfloat16, "bshd")
                scale = head_dim ** -0.5
                contenders = {}
                for hd, config in configs:
                    if hd == head_dim:
                        contenders[variant_label(hd, config)] = (
                            lambda c=config: flash_attn_forward_sm90(q, k, v, causal=causal, scale=scale, config=c))
                for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("fa2", SDPBackend.FLASH_ATTENTION)):
                    contenders[name] = (lambda b: lambda: _sdpa(b, (q, k, v), causal))(backend)
                if with_flashpatch:
                    contenders["flashpatch"] = lambda: flashpatch.attention(q, k, v, causal=causal)
                cell = {"head_dim": head_dim, "causal": causal, "n": n, "tflops": {}, "ms": {}, "errors": {}}
                for name, fn in contenders.items():
                    try:
                        ms = bench(fn, hang_seconds, f"bench {name} d{head_dim} causal={causal} N={n}")
                    except Exception as e:
                        cell["errors"][name] = f"{type(e).__name__}: {str(e).strip()[:200]}"
                        if name not in ("cudnn", "fa2"):
                            continue
                        try:  # an SDPA backend that refuses the [B, S, H, D] view: time it on contiguous copies
                            qkv = tuple(t.contiguous() for t in (q, k, v))
                            fn = (lambda b: lambda: _sdpa(b, qkv, causal))(
                                SDPBackend.CUDNN_ATTENTION if name == "cudnn" else SDPBackend.FLASH_ATTENTION)
                            ms = bench(fn, hang_seconds, f"bench {name} (contiguous) d{head_dim} N={n}")
                            cell["errors"][name] += " (timed on contiguous copies instead)"
                        except Exception as e2:
                            cell["errors"][name] += f"; contiguous: {type(e2).__name__}: {str(e2).strip()[:200]}"
                            continue
                    cell["ms"][name] = ms
                    cell["tflops"][name] = tflops(head_dim, n, causal, ms)
                for name in list(cell["ms"])[:2]:  # timed again: keep the better
                    try:
                        ms = bench(contenders[name], hang_seconds, f"bench again {name} d{head_dim} N={n}")
                    except Exception:
                        continue
                    cell.setdefault("ms_again", {})[name] = ms
                    if ms < cell["ms"][name]:
                        cell["ms"][name] = ms
                        cell["tflops"][name] = tflops(head_dim, n, causal, ms)
                ours = {name: t for name, t in cell["tflops"].items() if name.startswith("d") and name not in failed}
                cell["best_ours"] = max(ours, key=ours.get) if ours else None
                log(f"bench d{head_dim} {'causal' if causal else 'full  '} N={n:5d}: "
                    + ", ".join(f"{name.split(':')[-1]} {t:.0f}" for name, t in cell["tflops"].items())
                    + (f" | errors {cell['errors']}" if cell["errors"] else ""))
                bench_rows.append(cell)
                save()
                del q, k, v, contenders
                torch.cuda.empty_cache()


def run_feature_bench(configs, hang_seconds):
    """What the masks cost at d128 N = 4096 (masks that hide nothing, so the work is the plain one's)."""
    rows = STATE["results"].setdefault("feature_bench", [])
    n = 4096
    picks = [c for d, c in configs if d == 128][:1] + [c for d, c in configs if d == 128 and c.dynamic][:1]
    q, k, v = make_qkv(BATCH, HEADS, HEADS, n, n, 128, torch.bfloat16, "bshd")
    variants = {"plain": {}, "kpm": {"key_padding_mask": torch.ones(BATCH, n, dtype=torch.bool, device="cuda")},
                "seqused": {"seqused_k": torch.full((BATCH, ), n, dtype=torch.int32, device="cuda")},
                "seg": {"segment_ids": torch.zeros(BATCH, n, dtype=torch.int32, device="cuda")}}
    for config in picks:
        for causal in (False, True):
            cell = {"config": config.label(), "causal": causal, "n": n, "tflops": {}}
            for name, masks in variants.items():
                try:
                    ms = bench(lambda: flash_attn_forward_sm90(q, k, v, causal=causal, scale=128 ** -0.5,
                                                               config=config, **masks), hang_seconds,
                               f"feature bench {config.label()} {name} causal={causal}")
                    cell["tflops"][name] = tflops(128, n, causal, ms)
                except Exception as e:
                    cell["tflops"][name] = None
                    cell.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e).strip()[:200]}"
            log(f"feature bench d128 {config.label():36s} {'causal' if causal else 'full  '} N={n}: "
                + ", ".join(f"{k} {t:.0f}" if t else f"{k} -" for k, t in cell["tflops"].items()))
            rows.append(cell)
            save()


def print_table():
    rows = STATE["results"].get("bench", [])
    if not rows:
        return
    print("\nD    causal  N      ours  config                                 cuDNN   FA2  flashpatch  ours/cuDNN",
          flush=True)
    for r in rows:
        best = r["best_ours"]
        ours = r["tflops"].get(best) if best else None
        cudnn, fa2, fp = (r["tflops"].get(k) for k in ("cudnn", "fa2", "flashpatch"))

        def f(x):
            return f"{x:5.0f}" if x is not None else "    -"
        ratio = f"{ours / cudnn:9.2f}" if ours and cudnn else "        -"
        print(f"{r['head_dim']:<4d} {str(r['causal']):6s}  {r['n']:<5d}  {f(ours)}  "
              f"{(best or '-').split(':')[-1]:38s} {f(cudnn)} {f(fa2)}  {f(fp):>10s}  {ratio}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_out = os.path.join(os.environ["OUT"], "sm90_forward.json") if os.environ.get("OUT") else \
        "sm90_forward.json"
    parser.add_argument("--out", default=default_out)
    parser.add_argument("--head-dims", default="128,64,256", help="comma-separated, in the order to run")
    parser.add_argument("--only", default="", help="comma-separated config labels (as printed) to run")
    parser.add_argument("--skip", default="", help="comma-separated config labels to leave out")
    parser.add_argument("--extra", default="", help="comma-separated dD:LABEL configs outside SM90_CONFIGS to check "
                        "and time too (d64:m192n64s4+persist+dyn+ob)")
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--no-bench", action="store_true")
    parser.add_argument("--no-flashpatch", action="store_true", help="leave flashpatch.attention out of the timing")
    parser.add_argument("--no-features", action="store_true", help="skip the mask / head dim 80, 96 checks and timing")
    parser.add_argument("--hang-seconds", type=float, default=60.0)
    parser.add_argument("--budget", type=float, default=540.0, help="seconds after which no new timing cell starts")
    args = parser.parse_args()
    STATE["out"] = args.out
    head_dims = [int(d) for d in args.head_dims.split(",") if d]
    only = set(filter(None, args.only.split(",")))
    skip = set(filter(None, args.skip.split(",")))

    probe = torch.randn(1, 1, 16, 64, device="cuda", dtype=torch.bfloat16)
    env = {"torch": torch.__version__, "triton": triton.__version__, "gpu": torch.cuda.get_device_name(),
           "capability": torch.cuda.get_device_capability(), "cudnn": torch.backends.cudnn.version(),
           "gluon": forward_sm90.HAS_GLUON, "eligible": sm90_eligible(probe, probe, probe)}
    STATE["results"]["env"] = env
    log(f"env {env}")
    if not env["eligible"]:
        log("the sm90 Gluon kernel cannot run here (needs Hopper and Gluon)")
        save()
        sys.exit(1)
    extra = [(int(dim), config_from_label(label, int(dim))) for dim, label in
             (spec.removeprefix("d").split(":") for spec in filter(None, args.extra.split(",")))]
    configs = selected_configs(head_dims, only, skip, extra)
    log("configs: " + ", ".join(variant_label(d, c) for d, c in configs))

    failed = set() if args.no_check else run_checks(configs, args.hang_seconds)
    if not args.no_check and not args.no_features:
        run_feature_checks(head_dims, failed, args.hang_seconds)
    STATE["results"]["failed_variants"] = sorted(failed)
    log(f"checks done; failed: {sorted(failed) or 'none'}")
    if not args.no_bench:
        run_bench(configs, head_dims, failed, args.hang_seconds, args.budget, not args.no_flashpatch)
        if not args.no_features and any(d == 128 for d, _ in configs):
            run_feature_bench(configs, args.hang_seconds)
    save()
    log(f"results in {args.out}")
    print_table()


if __name__ == "__main__":
    main()
