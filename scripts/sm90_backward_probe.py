"""The Gluon sm90 backward (kernels/backward_sm90.py): does every candidate compile, is it right, how fast is it.

  python3 scripts/sm90_backward_probe.py --compile-only            (no GPU needed)
      Compiles every config of SM90_BWD_CONFIGS, causal and not, bf16 (and fp16 for each head dim's default), for
      GPUTarget("cuda", 90, 32) with Triton's bundled ptxas, and prints one line per kernel: shared memory (the
      limit is 232448 bytes), registers per thread and stack bytes (cuobjdump), ptxas's spill stores/loads, and
      the spill instructions (STL/LDL) per iteration of each query-block loop (the masked and unmasked loops of
      each consumer warpgroup, from the SASS). Also compiles the prep and convert kernels. Exits non-zero if
      anything fails to compile or passes the shared-memory limit.

  PYTHONUNBUFFERED=1 python3 scripts/sm90_backward_probe.py --out $OUT/sm90_backward.json    (on the GPU)
      1. Checks every config (causal and not; bf16, and fp16 for each head dim's default; head dims 80 and 96 on
         the 128-wide default) against float64 autograd through flashpatch.reference with FA2's rule for each of
         dq, dk, dv: |grad - ref64| <= 2 * |torch same-dtype grad - ref64| + eps, on fresh random inputs: odd
         lengths, bottom-right causal with Sq < Sk and Sq > Sk (rows without keys must get dq = 0 exactly), GQA
         32/8 and 8/1, the [B, S, H, D] projection layout, every output poisoned with NaN first. out and lse come
         from float64 (out rounded to the inputs' dtype), so only the backward is under test. The warp-specialised
         configs run every case again with a right-padding key mask (a batch keeping every key, one none, the
         others a random length; padding keys must get dk = dv = 0 exactly) and, where Sq == Sk, with packed
         segment ids of random lengths. One line per config: ok, or FAIL with the worst err/bound, or the compile
         error.
      2. Times fwd+bwd and the backward alone, bf16, 32 heads and 16K tokens (batch = 16384 / N; --batch fixes it
         instead), N = 1K..16K, head dims 128 and 64, causal and not: every config that passed its checks (only
         each head dim's default with --defaults-only) beside SDPA forced to cuDNN and to FlashAttention-2 and
         flashpatch's portable backward (flash_attn_backward with select_backward_config; its fwd+bwd is
         flashpatch.attention's autograd, the current training path, with FLASHPATCH_AUTOTUNE=0 unless set: on
         Hopper the Gluon forward's default config, then the dispatch's backward).
         Ours fwd+bwd is the Gluon forward's default config and then the backward. TFLOPS: forward
         4 * B * H * N^2 * D (halved causal), backward 2.5 times that, fwd+bwd 3.5 times.
      3. Writes JSON to --out as it goes and prints a table last.

A launch that does not finish within --hang-seconds prints which one, writes what was gathered and exits (a
deadlocked kernel cannot be interrupted otherwise); --skip LABELS leaves such a config out of the next run. No new
timing cell starts after --budget seconds.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

os.environ.setdefault("FLASHPATCH_AUTOTUNE", "0")  # the first candidate (Gluon's default): no timing of candidates

from flashpatch.kernels import backward_sm90  # noqa: E402
from flashpatch.kernels.backward_sm90 import (SHARED_MEMORY_LIMIT, SM90_BWD_CONFIGS, default_config,  # noqa: E402
                                              flash_attn_backward_sm90, sm90_backward_eligible)
from probe_support import STATE, log, make_qkv, poisoned_empty, save, watchdog  # noqa: E402

EPS = {torch.float16: 1e-4, torch.bfloat16: 1e-3}  # slack on FA2's 2x rule, as tests/helpers.py
# (batch, heads_q, heads_k, seq_q, seq_k, layout): ragged tails, one key, Sq < Sk and Sq > Sk, GQA, many blocks.
CHECK_CASES = [(2, 4, 4, 1000, 1000, "bhsd"), (1, 2, 2, 1, 1, "bhsd"), (1, 2, 1, 17, 17, "bshd"),
               (1, 2, 2, 255, 255, "bshd"), (2, 4, 2, 77, 333, "bshd"), (1, 2, 2, 300, 100, "bhsd"),
               (2, 32, 8, 640, 640, "bshd"), (2, 8, 1, 200, 513, "bshd"), (1, 4, 4, 2048, 2048, "bshd")]
BENCH_LENGTHS = (1024, 2048, 4096, 8192, 16384)
HEADS = 32

def variant_label(head_dim, config):
    return f"d{head_dim}:{config.label()}"


def selected_configs(head_dims, only, skip, everything=True):
    picked = []
    for head_dim in head_dims:
        for config in SM90_BWD_CONFIGS[head_dim] if everything else [default_config(head_dim)]:
            names = {config.label(), variant_label(head_dim, config)}
            if (only and not names & only) or names & skip:
                continue
            picked.append((head_dim, config))
    return picked


# ---------------------------------------------------------------------------------------------------------------
# --compile-only
# ---------------------------------------------------------------------------------------------------------------
def _tool(name):
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else None


def ptxas_info(ptx: str) -> dict:
    """Registers, spill stores/loads (bytes) and stack frame per function, from ptxas -v on the kernel's PTX."""
    tool = _tool("ptxas")
    if tool is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        done = subprocess.run([tool, "-arch=sm_90a", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True)
    text = done.stdout + done.stderr
    info = {}
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if spills:
        info["spill_stores"], info["spill_loads"] = int(spills.group(1)), int(spills.group(2))
    frame = re.search(r"(\d+) bytes stack frame", text)
    if frame:
        info["stack_frame"] = int(frame.group(1))
    regs = re.search(r"Used (\d+) registers", text)
    if regs:
        info["ptxas_registers"] = int(regs.group(1))
    return info


def compile_report(config, head_dim, causal, dtype) -> dict:
    from flashpatch.kernels.forward_sm90 import loop_census, ptx_census, resource_usage

    compiled = backward_sm90.compile_sm90(config, head_dim, causal=causal, dtype=dtype)
    loops = loop_census(compiled)
    census = ptx_census(compiled.asm["ptx"])
    return {"shared": compiled.metadata.shared, **resource_usage(compiled), **ptxas_info(compiled.asm["ptx"]),
            "loop_spills": [loop["spills"] for loop in loops] if loops is not None else None,
            "loop_instructions": [loop["instructions"] for loop in loops] if loops is not None else None,
            "wgmma": census["wgmma"], "setmaxnreg": census["setmaxnreg"]}


def compile_small_kernels() -> list[str]:
    """The prep and convert kernels (plain Triton) for sm90: the names of those that failed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failed = []
    for width in (64, 128):
        for name, kernel, ptrs, ints, constexprs in (
                ("prep", backward_sm90._bwd_prep_kernel, {"O": "*bf16", "DO": "*bf16", "LSE": "*fp32",
                                                         "DELTA": "*fp32", "LSE2": "*fp32", "DQ_ACC": "*fp32"},
                 ["stride_ob", "stride_oh", "stride_om", "stride_dob", "stride_doh", "stride_dom", "num_heads",
                  "seq_q", "padded_q", "head_dim"], dict(BLOCK_M=64, BLOCK_D=width, DQ_WIDTH=width)),
                ("convert", backward_sm90._bwd_dq_convert_kernel, {"DQ_ACC": "*fp32", "DQ": "*bf16"},
                 ["stride_dqb", "stride_dqh", "stride_dqm", "num_heads", "seq_q", "padded_q", "head_dim"],
                 dict(BLOCK_M=64, DQ_WIDTH=width))):
            names = kernel.arg_names
            signature = {n: "constexpr" if n in constexprs else ptrs.get(n, "i32" if n in ints else "fp32")
                         for n in names}
            source = ASTSource(kernel, signature, constexprs={(names.index(n), ): v for n, v in constexprs.items()})
            try:
                compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
                log(f"compile {name:8s} width {width:3d}: ok, shared {compiled.metadata.shared}")
            except Exception as e:
                failed.append(f"{name}-{width}")
                log(f"compile {name:8s} width {width:3d}: ERROR {type(e).__name__}: {str(e).strip()[-300:]}")
    return failed


def run_compile_only(configs) -> int:
    rows = STATE["results"].setdefault("compile", [])
    bad = compile_small_kernels()
    for head_dim, config in configs:
        dtypes = (torch.bfloat16, torch.float16) if config == default_config(head_dim) else (torch.bfloat16, )
        for dtype in dtypes:
            for causal in (False, True):
                label = variant_label(head_dim, config)
                started = time.time()
                try:
                    row = compile_report(config, head_dim, causal, dtype)
                except Exception as e:
                    lines = str(e).strip().splitlines()
                    row = {"error": f"{type(e).__name__}: {lines[-1] if lines else ''}"[:400]}
                row.update(variant=label, causal=causal, dtype=str(dtype)[6:], seconds=round(time.time() - started, 1))
                rows.append(row)
                if "error" in row or row["shared"] > SHARED_MEMORY_LIMIT:
                    bad.append(f"{label} {'causal' if causal else 'full'} {row['dtype']}")
                if "error" in row:
                    log(f"compile {label:36s} {'causal' if causal else 'full  '} {row['dtype']:8s} "
                        f"ERROR {row['error']}")
                else:
                    log(f"compile {label:36s} {'causal' if causal else 'full  '} {row['dtype']:8s} "
                        f"shared {row['shared']:6d}  regs {row.get('registers', '?')}  stack {row.get('stack', '?')}"
                        f"  ptxas spill st/ld {row.get('spill_stores', '?')}/{row.get('spill_loads', '?')}"
                        f"  loop spills {row['loop_spills']}  loop instructions {row['loop_instructions']}"
                        f"  ({row['seconds']} s)")
                save()
    STATE["results"]["compile_failures"] = bad
    save()
    log(f"compile-only done; failures: {bad or 'none'}")
    return 1 if bad else 0


# ---------------------------------------------------------------------------------------------------------------
# GPU: checks
# ---------------------------------------------------------------------------------------------------------------
def reference_out_lse(q, k, v, causal, scale, **masks):
    """out (in q's dtype, q's layout) and lse (float32) from float64: what a forward would hand the backward.
    masks: key_padding_mask, segment_ids."""
    from flashpatch.reference import reference_attention, visibility_mask

    out = reference_attention(q.double(), k.double(), v.double(), causal=causal, scale=scale, **masks)
    out = torch.empty_like(q).copy_(out)
    group = q.shape[1] // k.shape[1]
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double().repeat_interleave(group, 1)) * scale
    mask = visibility_mask(q.shape[2], k.shape[2], causal=causal, key_padding_mask=masks.get("key_padding_mask"),
                           segment_ids=masks.get("segment_ids"), device=q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return out, torch.logsumexp(scores, -1).float()


def reference_grads(q, k, v, grad_out, causal, scale, **masks):
    from flashpatch.reference import reference_attention

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    reference_attention(*leaves, causal=causal, scale=scale, **masks).backward(grad_out)
    return [t.grad for t in leaves]


def packed_segments(batch, seq):
    """int32 [B, S]: random lengths end to end, ids 0, 1, 2, ... (position_ids restarting)."""
    rows = []
    for _ in range(batch):
        lengths = torch.randint(1, max(2, seq // 2), (seq, ))
        rows.append(torch.repeat_interleave(torch.arange(seq), lengths)[:seq])
    return torch.stack(rows).to(device="cuda", dtype=torch.int32)


def right_padding(batch, seq_k):
    """bool [B, Sk], True = attend: batch 0 keeps every key, the last none, the others a random length."""
    lengths = torch.randint(0, seq_k + 1, (batch,), device="cuda")
    lengths[0], lengths[-1] = seq_k, 0 if batch > 1 else seq_k
    return torch.arange(seq_k, device="cuda")[None] < lengths[:, None]


def check_case(config, head_dim, case, causal, dtype, hang_seconds, label, masked=""):
    """masked: "" (none), "padded" (a right-padding key mask) or "packed" (segment ids; Sq == Sk cases only)."""
    batch, heads_q, heads_k, seq_q, seq_k, layout = case
    q, k, v = make_qkv(batch, heads_q, heads_k, seq_q, seq_k, head_dim, dtype, layout)
    grad_out = torch.randn_like(q)
    scale = head_dim ** -0.5
    masks = {"padded": lambda: dict(key_padding_mask=right_padding(batch, seq_k)),
             "packed": lambda: dict(segment_ids=packed_segments(batch, seq_q))}.get(masked, dict)()
    out, lse = reference_out_lse(q, k, v, causal, scale, **masks)
    with watchdog(hang_seconds, f"check {label} causal={causal} {dtype} case={case} {masked}"), poisoned_empty():
        ours = flash_attn_backward_sm90(grad_out, q, k, v, out, lse, causal=causal, scale=scale, config=config,
                                        **masks)
    ref64 = reference_grads(q.double(), k.double(), v.double(), grad_out.double(), causal, scale, **masks)
    same = reference_grads(q, k, v, grad_out, causal, scale, **masks)
    row = {"case": case, "masked": masked, "ok": True}
    for name, g, r, s, t in zip("qkv", ours, ref64, same, (q, k, v)):
        err = (g.double() - r).abs().max().item() if g.numel() else 0.0
        torch_err = (s.double() - r).abs().max().item() if g.numel() else 0.0
        bound = 2 * torch_err + EPS[dtype]
        finite = bool(torch.isfinite(g).all())
        row[f"d{name}"] = {"err": err, "torch_err": torch_err, "bound": bound, "finite": finite,
                           "shape_ok": g.shape == t.shape and g.dtype == t.dtype}
        row["ok"] = row["ok"] and finite and err <= bound and row[f"d{name}"]["shape_ok"]
    if causal and seq_q > seq_k:  # the first Sq - Sk query rows see no key: exactly zero dq
        row["empty_rows_zero"] = bool((ours[0][:, :, :seq_q - seq_k] == 0).all())
        row["ok"] = row["ok"] and row["empty_rows_zero"]
    if masked == "padded":  # padding keys get exactly zero dk and dv
        padding = ~masks["key_padding_mask"][:, None, :, None]
        row["padding_keys_zero"] = bool((ours[1].masked_select(padding) == 0).all()
                                        and (ours[2].masked_select(padding) == 0).all())
        row["ok"] = row["ok"] and row["padding_keys_zero"]
    row["worst"] = max(row[f"d{n}"]["err"] / row[f"d{n}"]["bound"] for n in "qkv")
    return row


def kernel_facts(config, head_dim, causal, dtype):
    compiled = backward_sm90.COMPILED.get((config, head_dim, causal, dtype))
    if compiled is None:
        return {}
    return {"n_regs": getattr(compiled, "n_regs", None), "n_spills": getattr(compiled, "n_spills", None),
            "shared": compiled.metadata.shared}


def run_checks(configs, hang_seconds):
    checks = STATE["results"].setdefault("checks", [])
    failed = set()
    plans = []
    for head_dim, config in configs:
        dtypes = (torch.bfloat16, torch.float16) if config == default_config(head_dim) else (torch.bfloat16, )
        plans += [(head_dim, config, dtype) for dtype in dtypes]
        if head_dim == 128 and config == default_config(128):  # the 128-wide kernel over narrower descriptors
            plans += [(80, default_config(80), torch.bfloat16), (96, default_config(96), torch.bfloat16)]
    for head_dim, config, dtype in plans:
        label = variant_label(head_dim, config)
        for causal in (False, True):
            rows, error = [], None
            try:
                for masked in ("", "padded", "packed") if config.warp_specialize else ("", ):  # masks: ws only
                    for case in CHECK_CASES:
                        if masked != "packed" or case[3] == case[4]:  # segment ids: Sq == Sk
                            rows.append(check_case(config, head_dim, case, causal, dtype, hang_seconds, label,
                                                   masked))
            except Exception as e:  # a compile error or a launch failure: one line, then the next variant
                lines = str(e).strip().splitlines()
                error = f"{type(e).__name__}: {lines[-1] if lines else ''}"[:300]
            passed = error is None and all(r["ok"] for r in rows)
            if not passed:
                failed.add(label)
            facts = kernel_facts(config, head_dim, causal, dtype)
            worst = max((r["worst"] for r in rows), default=float("nan"))
            log(f"check {label:36s} {'causal' if causal else 'full  '} {str(dtype)[6:]:8s} "
                f"{'ok  ' if passed else 'FAIL'} {sum(r['ok'] for r in rows)}/{len(rows)} cases, "
                f"worst err/bound {worst:.2f}, {facts}" + (f" ERROR {error}" if error else ""))
            for r in rows:
                if not r["ok"]:
                    log(f"    failed case {r}")
            checks.append({"variant": label, "causal": causal, "dtype": str(dtype), "passed": passed,
                           "error": error, "cases": rows, **facts})
            save()
    return failed


# ---------------------------------------------------------------------------------------------------------------
# GPU: timing
# ---------------------------------------------------------------------------------------------------------------
def fwd_flops(batch, head_dim, n, causal):
    return 4 * batch * HEADS * n * n * head_dim * (0.5 if causal else 1.0)


def bench(fn, hang_seconds, what):
    import triton

    with watchdog(hang_seconds, what):
        fn()  # compile outside the timing
    with watchdog(max(hang_seconds, 120), what):
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def run_bench(configs, head_dims, failed, hang_seconds, budget, batch_arg, tokens):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import flashpatch
    from flashpatch.kernels.backward import flash_attn_backward
    from flashpatch.kernels.config import select_backward_config
    from flashpatch.kernels.forward_sm90 import flash_attn_forward_sm90

    rows = STATE["results"].setdefault("bench", [])
    for head_dim in head_dims:
        for causal in (False, True):
            for n in BENCH_LENGTHS:
                if time.time() - STATE["started"] > budget:
                    log(f"time budget of {budget} s spent: stopping before d{head_dim} causal={causal} N={n}")
                    return
                batch = batch_arg or max(1, tokens // n)
                q, k, v = make_qkv(batch, HEADS, HEADS, n, n, head_dim, torch.bfloat16, "bshd")
                grad_out = torch.randn_like(q)
                scale = head_dim ** -0.5
                out, lse = flash_attn_forward_sm90(q, k, v, causal=causal, scale=scale)
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                fwd, bwd = {}, {}  # name -> fn timing fwd+bwd / the backward alone
                for hd, config in configs:
                    if hd != head_dim or variant_label(hd, config) in failed:
                        continue
                    name = variant_label(hd, config)

                    def ours_bwd(c=config):
                        return flash_attn_backward_sm90(grad_out, q, k, v, out, lse, causal=causal, scale=scale,
                                                        config=c)

                    def ours_both(c=config):
                        o, m = flash_attn_forward_sm90(q, k, v, causal=causal, scale=scale)
                        return flash_attn_backward_sm90(grad_out, q, k, v, o, m, causal=causal, scale=scale,
                                                        config=c)

                    fwd[name], bwd[name] = ours_both, ours_bwd
                backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "fa2": SDPBackend.FLASH_ATTENTION}

                def sdpa_fns(inputs, name, kind):
                    grad = grad_out if inputs is leaves else grad_out.contiguous()
                    if kind == "fwd_bwd":
                        def both():
                            with sdpa_kernel(backends[name]):
                                o = F.scaled_dot_product_attention(*inputs, is_causal=causal, scale=scale)
                            return torch.autograd.grad(o, inputs, grad)
                        return both
                    with sdpa_kernel(backends[name]):  # one forward; the timed calls re-run its backward
                        o = F.scaled_dot_product_attention(*inputs, is_causal=causal, scale=scale)
                    return lambda: torch.autograd.grad(o, inputs, grad, retain_graph=True)

                contiguous = [t.detach().contiguous().requires_grad_() for t in leaves]
                for name in backends:
                    fwd[name] = sdpa_fns(leaves, name, "fwd_bwd")
                    try:
                        bwd[name] = sdpa_fns(leaves, name, "bwd")
                    except Exception:  # the forward refused the views: the timing loop falls back to copies
                        bwd[name] = sdpa_fns(contiguous, name, "bwd")
                portable = select_backward_config("sm90", head_dim)
                bwd["portable"] = lambda: flash_attn_backward(grad_out, q, k, v, out, lse, causal=causal, scale=scale,
                                                              key_padding_mask=None, config=portable)
                fwd["flashpatch"] = lambda: torch.autograd.grad(
                    flashpatch.attention(*leaves, causal=causal, scale=scale), leaves, grad_out)
                cell = {"head_dim": head_dim, "causal": causal, "n": n, "batch": batch, "tflops_fwd_bwd": {},
                        "tflops_bwd": {}, "ms_fwd_bwd": {}, "ms_bwd": {}, "errors": {}}
                flops = fwd_flops(batch, head_dim, n, causal)
                for kind, table, factor in (("fwd_bwd", fwd, 3.5), ("bwd", bwd, 2.5)):
                    for name, fn in table.items():
                        what = f"bench {kind} {name} d{head_dim} causal={causal} N={n}"
                        try:
                            ms = bench(fn, hang_seconds, what)
                        except Exception as e:
                            cell["errors"][f"{kind}:{name}"] = f"{type(e).__name__}: {str(e).strip()[:200]}"
                            if name not in ("cudnn", "fa2"):
                                continue
                            try:  # an SDPA backend that refuses the [B, S, H, D] views: time it on copies
                                ms = bench(sdpa_fns(contiguous, name, kind), hang_seconds, what + " (contiguous)")
                                cell["errors"][f"{kind}:{name}"] += " (timed on contiguous copies instead)"
                            except Exception as e2:
                                cell["errors"][f"{kind}:{name}"] += f"; contiguous: {type(e2).__name__}"
                                continue
                        cell[f"ms_{kind}"][name] = ms
                        cell[f"tflops_{kind}"][name] = factor * flops / (ms * 1e-3) / 1e12
                ours = {k2: t for k2, t in cell["tflops_bwd"].items() if k2.startswith("d")}
                cell["best_ours"] = max(ours, key=ours.get) if ours else None
                log(f"bench d{head_dim} {'causal' if causal else 'full  '} N={n:5d} B={batch:2d}: bwd "
                    + ", ".join(f"{k2.split(':')[-1]} {t:.0f}" for k2, t in cell["tflops_bwd"].items())
                    + " | fwd+bwd " + ", ".join(f"{k2.split(':')[-1]} {t:.0f}"
                                                for k2, t in cell["tflops_fwd_bwd"].items())
                    + (f" | errors {cell['errors']}" if cell["errors"] else ""))
                rows.append(cell)
                save()
                del q, k, v, grad_out, out, lse, leaves, contiguous, fwd, bwd
                torch.cuda.empty_cache()


def print_table():
    rows = STATE["results"].get("bench", [])
    if not rows:
        return
    print("\nbackward TFLOPS (fwd+bwd in brackets); ours = the best config")
    print("D    causal  N      ours            config                              cuDNN           FA2"
          "             portable  flashpatch  ours/cuDNN", flush=True)

    def f(x):
        return f"{x:5.0f}" if x is not None else "    -"
    for r in rows:
        best = r["best_ours"]
        b, fb = r["tflops_bwd"], r["tflops_fwd_bwd"]
        ratio = f"{b[best] / b['cudnn']:9.2f}" if best and b.get("cudnn") else "        -"
        print(f"{r['head_dim']:<4d} {str(r['causal']):6s}  {r['n']:<5d}  {f(b.get(best))} [{f(fb.get(best))}]  "
              f"{(best or '-').split(':')[-1]:34s} {f(b.get('cudnn'))} [{f(fb.get('cudnn'))}]  "
              f"{f(b.get('fa2'))} [{f(fb.get('fa2'))}]  {f(b.get('portable'))}     [{f(fb.get('flashpatch'))}]"
              f"  {ratio}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_out = os.path.join(os.environ["OUT"], "sm90_backward.json") if os.environ.get("OUT") else \
        "sm90_backward.json"
    parser.add_argument("--out", default=default_out)
    parser.add_argument("--compile-only", action="store_true", help="compile every config for sm90 (no GPU)")
    parser.add_argument("--head-dims", default="128,64", help="comma-separated, in the order to run")
    parser.add_argument("--only", default="", help="comma-separated config labels (as printed) to run")
    parser.add_argument("--skip", default="", help="comma-separated config labels to leave out")
    parser.add_argument("--defaults-only", action="store_true", help="time each head dim's default config only")
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--no-bench", action="store_true")
    parser.add_argument("--hang-seconds", type=float, default=60.0)
    parser.add_argument("--budget", type=float, default=400.0, help="seconds after which no new timing cell starts")
    parser.add_argument("--batch", type=int, default=0, help="timing batch (default: 16K tokens / N)")
    parser.add_argument("--tokens", type=int, default=16384)
    args = parser.parse_args()
    STATE["out"] = args.out
    head_dims = [int(d) for d in args.head_dims.split(",") if d]
    only = set(filter(None, args.only.split(",")))
    skip = set(filter(None, args.skip.split(",")))

    if args.compile_only:
        import triton
        STATE["results"]["env"] = {"torch": torch.__version__, "triton": triton.__version__,
                                   "gluon": backward_sm90.HAS_GLUON}
        log(f"env {STATE['results']['env']}")
        if not backward_sm90.HAS_GLUON:
            log("this Triton has no Gluon (Triton 3.6's API is the one the kernel is written for)")
            sys.exit(1)
        sys.exit(run_compile_only(selected_configs(head_dims, only, skip)))

    import triton
    probe = torch.randn(1, 1, 16, 64, device="cuda", dtype=torch.bfloat16)
    env = {"torch": torch.__version__, "triton": triton.__version__, "gpu": torch.cuda.get_device_name(),
           "capability": torch.cuda.get_device_capability(), "cudnn": torch.backends.cudnn.version(),
           "gluon": backward_sm90.HAS_GLUON, "eligible": sm90_backward_eligible(probe, probe, probe, probe, probe)}
    STATE["results"]["env"] = env
    log(f"env {env}")
    if not env["eligible"]:
        log("the sm90 Gluon backward cannot run here (needs Hopper and Gluon)")
        save()
        sys.exit(1)
    configs = selected_configs(head_dims, only, skip)
    log("configs: " + ", ".join(variant_label(d, c) for d, c in configs))
    failed = set() if args.no_check else run_checks(configs, args.hang_seconds)
    STATE["results"]["failed_variants"] = sorted(failed)
    log(f"checks done; failed: {sorted(failed) or 'none'}")
    if not args.no_bench:
        timed = [(d, c) for d, c in configs if c == default_config(d)] if args.defaults_only else configs
        run_bench(timed, head_dims, failed, args.hang_seconds, args.budget, args.batch, args.tokens)
    save()
    log(f"results in {args.out}")
    print_table()


if __name__ == "__main__":
    main()
