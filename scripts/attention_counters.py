"""Hardware counters of one attention call on a Hopper GPU: flashpatch's kernels beside cuDNN's and FA2's.

Each backend's call runs under Nsight Compute (`ncu --clock-control none`) in a child process of this script, after
warm-up calls (compilation, autotuning) outside the profiled range. Every kernel of the profiled call gets a row:
its time, SM and DRAM throughput, tensor-pipe activity, issue-slot use, and the warp stall reasons that cost the
most cycles per issued instruction. `--pass backward` profiles the backward alone, so flashpatch's prep, main and
dQ-convert launches show as rows of their own. Backends: `flashpatch` (flashpatch.attention, autotuned as shipped),
`cudnn` and `flash` (SDPA forced to that backend), `gluon:LABEL` (the Gluon sm90 forward with one config, labels as
scripts/sm90_forward_probe.py prints them; forward only).

Usage (a GPU where ncu reads counters):
    python3 scripts/attention_counters.py [--head-dim 128] [--n 2048] [--causal] [--pass forward|backward]
        [--heads 32 --kv-heads 8] [--sinks] [--backends flashpatch,cudnn,flash,gluon:m128n128s2+ov+pp] [--json]
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import re
import shutil
import subprocess
import sys

SECTIONS = ("SpeedOfLight", "ComputeWorkloadAnalysis", "WarpStateStats", "SchedulerStats", "LaunchStats")
TO_US = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}
STALL = re.compile(r"smsp__average_warps?_(?:latency_)?issue_stalled_(\w+?)_per_issue_active\.ratio")


def make_call(backend: str, args, backward: bool):
    """The inputs and a function that runs one call of `backend` (out, for the backward to start from)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    head_dim, causal, kv_heads = args.head_dim, args.causal, args.kv_heads or args.heads

    def projection(heads):  # transformers' [B, S, H, D] projections, viewed as [B, H, S, D]
        shape = (args.batch, args.n, heads, head_dim)
        return torch.randn(shape, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_(backward)

    q, k, v = projection(args.heads), projection(kv_heads), projection(kv_heads)
    sinks = torch.randn(args.heads, device="cuda") * 2 if args.sinks else None
    if backend == "flashpatch":
        import flashpatch

        return lambda: flashpatch.attention(q, k, v, causal=causal, sinks=sinks)
    if sinks is not None:
        raise SystemExit(f"--sinks: only the flashpatch backend takes sinks, not {backend!r}")
    if backend in ("cudnn", "flash"):
        which = SDPBackend.CUDNN_ATTENTION if backend == "cudnn" else SDPBackend.FLASH_ATTENTION

        def sdpa():
            with sdpa_kernel(which):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=kv_heads != args.heads)
        return sdpa
    if backend.startswith("gluon:") and not backward:
        from flashpatch.kernels.forward_sm90 import flash_attn_forward_sm90
        from sm90_forward_probe import config_from_label

        config = config_from_label(backend.split(":", 1)[1], head_dim)
        return lambda: flash_attn_forward_sm90(q, k, v, causal=causal, scale=head_dim ** -0.5, config=config)[0]
    raise SystemExit(f"unknown backend {backend!r} (flashpatch, cudnn, flash, gluon:LABEL; gluon forward only)")


def child(args) -> None:
    """Warm up, then run one call (or its backward) inside the profiler's range."""
    import torch

    backward = args.pass_ == "backward"
    call = make_call(args.child, args, backward)
    grad = None
    for _ in range(3):
        out = call()
        if backward:
            grad = torch.randn_like(out) if grad is None else grad
            out.backward(grad)
    out = call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    if backward:
        out.backward(grad)
    else:
        call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def find_ncu() -> str | None:
    found = shutil.which("ncu") or sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"))
    return found if isinstance(found, str) else (found[-1] if found else None)


def number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def parse_raw_csv(stdout: str) -> list[dict]:
    """ncu's `--page raw --csv`: a header of metric names, a row of units, then one row per kernel."""
    rows = list(csv.reader(line for line in stdout.splitlines() if line.startswith('"')))
    if len(rows) < 2:
        return []
    header = rows[0]
    has_units = rows[1][0] == ""  # the units row leaves the ID column empty
    units = rows[1] if has_units else [""] * len(header)
    kernels = []
    for row in rows[1 + has_units:]:
        raw = dict(zip(header, row))
        unit = dict(zip(header, units))
        time_key = "gpu__time_duration.sum"
        value = lambda key: number(raw.get(key, ""))  # noqa: E731
        tensor = [value(key) for key in header if "pipe_tensor" in key and key.endswith("pct_of_peak_sustained_active")]
        stalls = sorted(((STALL.fullmatch(key).group(1), value(key)) for key in header
                         if STALL.fullmatch(key) and value(key) is not None), key=lambda kv: -kv[1])
        kernels.append(dict(
            kernel=raw.get("Kernel Name", "?"),
            us=(value(time_key) or 0.0) * TO_US.get(unit.get(time_key, "usecond"), 1.0),
            sm_pct=value("sm__throughput.avg.pct_of_peak_sustained_elapsed"),
            dram_pct=value("dram__throughput.avg.pct_of_peak_sustained_elapsed"),
            tensor_pct=max((t for t in tensor if t is not None), default=None),
            issue_pct=value("sm__inst_issued.avg.pct_of_peak_sustained_active"),
            regs=value("launch__registers_per_thread"),
            stalls=[(name, v) for name, v in stalls if name != "selected"][:4]))
    return kernels


def profile(ncu: str, backend: str, args) -> list[dict] | str:
    command = [ncu, "--clock-control", "none", "--profile-from-start", "off", "--target-processes", "all",
               "--page", "raw", "--csv", *(x for s in SECTIONS for x in ("--section", s)),
               sys.executable, __file__, "--child", backend, "--head-dim", str(args.head_dim), "--n", str(args.n),
               "--batch", str(args.batch), "--heads", str(args.heads), "--kv-heads", str(args.kv_heads),
               "--pass", args.pass_]
    command += (["--causal"] if args.causal else []) + (["--sinks"] if args.sinks else [])
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return f"ncu did not finish within {args.timeout:.0f} s"
    kernels = parse_raw_csv(done.stdout)
    if kernels:
        return kernels
    errors = [line for line in (done.stdout + done.stderr).splitlines() if "ERR" in line or "Error" in line]
    return (errors or [f"no kernel profiled (exit {done.returncode})"])[-1][:160]


def cell(value, digits=0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--n", type=int, default=2048, help="query and key length")
    parser.add_argument("--batch", type=int, default=0, help="default 16384 // n (16K tokens)")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=0, help="GQA: K/V heads (default: --heads)")
    parser.add_argument("--sinks", action="store_true", help="a sink logit per head (flashpatch only)")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--pass", dest="pass_", choices=("forward", "backward"), default="forward")
    parser.add_argument("--backends", default="flashpatch,cudnn,flash")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds for each backend's profiled run")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batch = args.batch or max(1, 16384 // args.n)
    if args.child:
        return child(args)
    ncu = find_ncu()
    if ncu is None:
        raise SystemExit("ncu not found: this script needs Nsight Compute (on PATH or under /opt/nvidia)")
    results = {backend: profile(ncu, backend, args) for backend in args.backends.split(",")}
    if args.json:
        print(json.dumps(dict(vars(args), results=results), indent=1))
        return
    print(f"{args.pass_}, d{args.head_dim}, N {args.n}, batch {args.batch} x {args.heads}/{args.kv_heads or args.heads}"
          f" heads, bf16, {'causal' if args.causal else 'non-causal'}{', sinks' if args.sinks else ''}")
    print(f"{'backend':11} {'kernel':28} {'us':>7} {'SM%':>4} {'DRAM%':>5} {'tens%':>5} {'iss%':>4} {'regs':>4}")
    for backend, kernels in results.items():
        if isinstance(kernels, str):
            print(f"{backend[:11]:11} {kernels[:66]}")
            continue
        for kernel in kernels:
            print(f"{backend[:11]:11} {kernel['kernel'][:28]:28} {kernel['us']:7.1f} {cell(kernel['sm_pct']):>4} "
                  f"{cell(kernel['dram_pct']):>5} {cell(kernel['tensor_pct']):>5} {cell(kernel['issue_pct']):>4} "
                  f"{cell(kernel['regs']):>4}")
            stalls = ", ".join(f"{name} {v:.2f}" for name, v in kernel["stalls"])
            print(f"{'':11}   stalls/issue: {stalls[:64]}")
        print(f"{backend[:11]:11} {'total':28} {sum(k['us'] for k in kernels):7.1f}")


if __name__ == "__main__":
    main()
