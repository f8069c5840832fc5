"""Backward tiles on sm90 (H100/H200) at head dims 64, 128 and 256: the table's rows against candidate rows.

Two modes, one candidate list (CANDIDATES below; kernels/config.py's BACKWARD_TABLE is only read):

  python3 scripts/backward_tiles_sm90.py --compile-only [--head-dims 256]
      No GPU needed. Compiles the dK/dV and dQ kernels of kernels/backward.py for GPUTarget("cuda", 90, 32) in bf16
      with a plain training call's specialisations (16-byte aligned pointers, unit inner strides, other strides and
      lengths multiples of 16, MHA, no mask, segments or dropout), through Triton's bundled ptxas, and prints per
      kernel tile and causal flag: shared memory (<= 232448 bytes on sm90), registers, spilled bytes, wgmma count.

  python3 scripts/backward_tiles_sm90.py [--out FILE]            (on the GPU)
      Per head dim (bf16, batch 8, 32 heads unless --batch/--heads say otherwise; N 2048 and 4096; causal and not):
      1. compiles every row and checks its gradients against float64 SDPA (math) on a small shape with FA2's rule
         (|ours - ref64| <= 2 |torch bf16 - ref64| + 1e-2 per gradient), in worker processes, so compiles run in
         parallel and land in Triton's cache for the timing; each row's registers, spills (Triton's n_spills, 4-byte
         words of local memory) and shared memory are printed; a row that fails (error, wrong numbers) is reported in
         one line and dropped, and with --drop-spilling so is a candidate that spills;
      2. times fwd+bwd (forward kernel + flash_attn_backward with the row's BackwardConfig passed explicitly) and the
         backward alone with triton.testing.do_bench (median), next to SDPA forced to cuDNN and to flash
         (torch.nn.attention.sdpa_kernel);
      3. writes JSON to --out (default $OUT/backward_tiles.json when OUT is set) and prints a table last.
      TFLOPS count the FA2 way: forward 4 B H N^2 D (halved causal), backward 2.5 times that.
"""

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
from collections import Counter

# The kernels package from this checkout (installed as flashpatch.kernels; importable without an install).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels.config import BACKWARD_TABLE, BackwardConfig, TileConfig  # noqa: E402

T = TileConfig
# Candidate rows per padded head dim; the table's sm90 row is always timed first.
# At 256 the dK/dV kernel holds two [block_n, 256] float32 accumulators (dK, dV) and the K and V tiles: at block_n 64
# and 4 warps the accumulators alone are 256 registers a thread, so the table's (32, 64, 4, 2) spills about 1 KB of
# local memory a thread (ptxas: 2 to 3.4 KB of spill stores, Triton 3.6 and 3.9 alike). 8 warps halve that: (16, 64,
# 8, 2) compiles without spills, (64, 64, 8, 2) with about 370 bytes, and on an H200 (Triton 3.6, batch 8, 32 heads,
# N 2048 and 4096) dK/dV (64, 64, 8, 2) with dQ (128, 32, 8, 2) ran fwd+bwd at 226 to 274 TFLOPS where the table's
# row ran 111 to 121 and SDPA's flash backend 219 to 269: a small spill costs far less than 4-warp tiles or 16-row
# query blocks, so spills are reported, not disqualifying (--drop-spilling makes them so).
CANDIDATES: dict[int, list[BackwardConfig]] = {
    64: [BackwardConfig(T(64, 128, 8, 3), T(128, 64, 8, 3)),
         BackwardConfig(T(32, 128, 8, 3), T(128, 128, 8, 3))],
    128: [BackwardConfig(T(32, 128, 8, 3), T(128, 64, 8, 3)),
          BackwardConfig(T(32, 128, 8, 2), T(128, 32, 8, 3))],
    256: [BackwardConfig(T(64, 64, 8, 2), T(128, 32, 8, 2)),
          BackwardConfig(T(64, 64, 8, 2), T(128, 64, 8, 1)),
          BackwardConfig(T(64, 64, 8, 1), T(128, 32, 8, 2)),
          BackwardConfig(T(32, 64, 8, 3), T(128, 32, 8, 2)),
          BackwardConfig(T(32, 64, 8, 2), T(128, 32, 8, 2)),
          BackwardConfig(T(16, 64, 8, 2), T(128, 32, 8, 2))],
}

SMEM_SM90 = 232448


def rows_for(head_dim: int) -> list[BackwardConfig]:
    return [BACKWARD_TABLE["sm90"][head_dim], *CANDIDATES[head_dim]]


def row_name(cfg: BackwardConfig) -> str:
    a, b = cfg.dkdv, cfg.dq
    return (f"dkdv({a.block_m},{a.block_n},{a.num_warps},{a.num_stages})"
            f"+dq({b.block_m},{b.block_n},{b.num_warps},{b.num_stages})")


# ---------------------------------------------------------------------------------------------------------------
# --compile-only: sm90 code without a GPU
# ---------------------------------------------------------------------------------------------------------------

def compile_sm90(kernel, tile: TileConfig, head_dim: int, causal: bool):
    """(compiled kernel, ptxas log) for one backward kernel and tile: bf16, a plain MHA training call."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    constexprs = dict(BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_D=head_dim, CAUSAL=causal, HAS_KPM=False,
                      HAS_SEG=False, DOT_PRECISION="tf32", DROPOUT=False, BOUNDARY=False, group_size=1)
    constexprs.update({n: 1 for n in names if n.startswith("stride_") and n.endswith("d")})  # unit inner strides
    bf16 = {"Q", "K", "V", "DO", "DK", "DV", "DQ"}
    fp32 = {"LSE", "DELTA", "KPM", "SEG"}  # KPM and SEG get delta's pointer when unused
    floats = {"qk_scale", "sm_scale", "dropout_p"}
    signature = {}
    for n in names:
        if n in constexprs:
            signature[n] = "constexpr"
        elif n in bf16:
            signature[n] = "*bf16"
        elif n in fp32:
            signature[n] = "*fp32"
        else:
            signature[n] = "fp32" if n in floats else "i32"
    # Pointers and every remaining integer (strides, lengths, head counts, seed 0, unused mask strides 0) are
    # multiples of 16 in such a call.
    aligned = [n for n in names if signature[n] not in ("constexpr", "fp32")]
    source = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=tile.num_warps, num_stages=tile.num_stages))
    return compiled, log.getvalue()


def ptx_census(compiled, ptxas_log: str) -> dict:
    ptx = compiled.asm["ptx"]
    regs = re.findall(r"Used (\d+) registers", ptxas_log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    stack = re.findall(r"(\d+) bytes stack frame", ptxas_log)
    return {"shared": compiled.metadata.shared,
            "regs": int(regs[-1]) if regs else None,
            "spill_stores": int(spills[-1][0]) if spills else None,
            "spill_loads": int(spills[-1][1]) if spills else None,
            "stack": int(stack[-1]) if stack else None,
            "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
            "mma.sync": len(re.findall(r"\bmma\.sync", ptx)),
            "wgmma_waits": dict(sorted(Counter(re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx)).items()))}


def compile_report(head_dims, extra_tiles: bool) -> list[dict]:
    import triton

    from kernels import backward as bwd

    kernels = {"dkdv": bwd._flash_bwd_dkdv_kernel, "dq": bwd._flash_bwd_dq_kernel}
    results = []
    print(f"triton {triton.__version__}, target sm90, bf16; shared limit {SMEM_SM90} B")
    for head_dim in head_dims:
        tiles = {"dkdv": [], "dq": []}
        for cfg in rows_for(head_dim):
            for which in tiles:
                tile = getattr(cfg, which)
                if tile not in tiles[which]:
                    tiles[which].append(tile)
        if extra_tiles and head_dim == 256:
            for tile in EXTRA_TILES_256["dkdv"]:
                tiles["dkdv"] += [tile] if tile not in tiles["dkdv"] else []
            for tile in EXTRA_TILES_256["dq"]:
                tiles["dq"] += [tile] if tile not in tiles["dq"] else []
        for which, kernel in kernels.items():
            for tile in tiles[which]:
                for causal in (False, True):
                    entry = {"head_dim": head_dim, "kernel": which, "tile": list(tile[:4]) if isinstance(tile, tuple)
                             else [tile.block_m, tile.block_n, tile.num_warps, tile.num_stages], "causal": causal}
                    start = time.time()
                    try:
                        compiled, log = compile_sm90(kernel, tile, head_dim, causal)
                        entry.update(ptx_census(compiled, log))
                    except Exception as exc:  # noqa: BLE001 (a tile that does not compile is a result)
                        entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    entry["compile_s"] = round(time.time() - start, 1)
                    results.append(entry)
                    print(format_compile_entry(entry), flush=True)
    return results


# Kernel tiles compiled at head dim 256 beyond the rows' own, to see where registers run out.
EXTRA_TILES_256 = {
    "dkdv": [T(32, 64, 4, 1), T(16, 64, 8, 2), T(32, 64, 8, 1), T(16, 64, 8, 1), T(64, 64, 8, 1), T(16, 128, 8, 1),
             T(64, 128, 8, 1), T(16, 32, 4, 2), T(32, 32, 4, 2), T(16, 32, 4, 1)],
    "dq": [T(64, 32, 4, 1), T(64, 16, 4, 2), T(64, 64, 4, 2), T(128, 32, 8, 1), T(128, 64, 8, 2), T(128, 16, 8, 2),
           T(64, 16, 8, 2), T(32, 32, 4, 2)],
}


def format_compile_entry(e: dict) -> str:
    tile = "({},{},{},{})".format(*e["tile"])
    head = f"d{e['head_dim']} {e['kernel']:4} {tile:14} causal={int(e['causal'])}"
    if "error" in e:
        return f"{head}  FAILED {e['error']}"
    fits = "ok" if e["shared"] <= SMEM_SM90 else "OVER"
    return (f"{head}  shared {e['shared']:6} ({fits})  regs {e['regs']}  spill st/ld {e['spill_stores']}/"
            f"{e['spill_loads']}  stack {e['stack']}  wgmma {e['wgmma']}  mma.sync {e['mma.sync']}  "
            f"({e['compile_s']} s)")


# ---------------------------------------------------------------------------------------------------------------
# GPU: correctness (worker processes) and timing
# ---------------------------------------------------------------------------------------------------------------

CHECK_SHAPE = dict(batch=1, heads=16, seq=256)  # the timing shapes' specialisation classes (all multiples of 16)


def check_row(head_dim: int, row: BackwardConfig) -> dict:
    """Compile and check one row (both causal flags) on the small shape; registers, spills and shared memory of the
    kernels it compiled. Runs in a worker process."""
    import torch

    import kernels
    from kernels import backward as bwd

    torch.manual_seed(0)
    out = {"head_dim": head_dim, "row": row_name(row), "ok": True, "errors": [], "kernels": {}}
    try:
        for causal in (False, True):
            b, h, n = CHECK_SHAPE["batch"], CHECK_SHAPE["heads"], CHECK_SHAPE["seq"]
            q, k, v = (torch.randn(b, h, n, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            grad_out = torch.randn_like(q)
            scale = head_dim ** -0.5
            fwd_cfg = kernels.select_config("sm90", head_dim, n)
            o, lse = kernels.flash_attn_forward(q, k, v, causal=causal, scale=scale, key_padding_mask=None,
                                                config=fwd_cfg)
            ours = kernels.flash_attn_backward(grad_out, q, k, v, o, lse, causal=causal, scale=scale,
                                               key_padding_mask=None, config=row)
            torch.cuda.synchronize()
            ref = sdpa_grads(q.double(), k.double(), v.double(), grad_out.double(), causal, "math")
            same = sdpa_grads(q, k, v, grad_out, causal, "math")
            for name, g, r, s in zip("qkv", ours, ref, same):
                if not torch.isfinite(g).all():
                    out["ok"] = False
                    out["errors"].append(f"causal={causal} d{name} not finite")
                    continue
                err = (g.double() - r).abs().max().item()
                torch_err = (s.double() - r).abs().max().item()
                out[f"err_d{name}_causal{int(causal)}"] = [err, torch_err]
                if err > 2 * torch_err + 1e-2:
                    out["ok"] = False
                    out["errors"].append(f"causal={causal} d{name} error {err:.3g} vs torch bf16 {torch_err:.3g}")
        for which, launcher, tile in (("dkdv", bwd._launch_dkdv, row.dkdv), ("dq", bwd._launch_dq, row.dq)):
            stats = []
            for compiled in launcher.variants(torch.bfloat16, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
                                              BLOCK_D=head_dim, num_warps=tile.num_warps,
                                              num_stages=tile.num_stages):
                stats.append({"regs": compiled.n_regs, "spills": compiled.n_spills,
                              "shared": compiled.metadata.shared})
            out["kernels"][which] = stats
    except Exception as exc:  # noqa: BLE001 (one line per failed row; the sweep goes on)
        out["ok"] = False
        out["errors"].append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    return out


def sdpa_grads(q, k, v, grad_out, causal: bool, backend: str):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(backends[backend]):
        torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=causal).backward(grad_out)
    return [t.grad for t in leaves]


def flops(batch, heads, seq, head_dim, causal, mode):
    fwd = 4 * batch * heads * seq * seq * head_dim / (2 if causal else 1)
    return {"fwd+bwd": 3.5 * fwd, "bwd": 2.5 * fwd}[mode]


def time_rows(head_dim, rows, batch, heads, seqs, log) -> list[dict]:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    import kernels

    results = []
    scale = head_dim ** -0.5
    for seq in seqs:
        for causal in (False, True):
            torch.manual_seed(0)
            q, k, v = (torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16)
                       for _ in range(3))
            grad_out = torch.randn_like(q)
            fwd_cfg = kernels.select_config("sm90", head_dim, seq)

            def forward():
                return kernels.flash_attn_forward(q, k, v, causal=causal, scale=scale, key_padding_mask=None,
                                                  config=fwd_cfg)

            o, lse = forward()
            cell = {"head_dim": head_dim, "seq": seq, "causal": causal, "batch": batch, "heads": heads, "rows": {}}
            for row in rows:
                name = row_name(row)
                try:
                    def both(row=row):
                        o2, lse2 = forward()
                        return kernels.flash_attn_backward(grad_out, q, k, v, o2, lse2, causal=causal, scale=scale,
                                                           key_padding_mask=None, config=row)

                    def backward(row=row):
                        return kernels.flash_attn_backward(grad_out, q, k, v, o, lse, causal=causal, scale=scale,
                                                           key_padding_mask=None, config=row)

                    t_both = do_bench(both, warmup=25, rep=100, return_mode="median")
                    t_bwd = do_bench(backward, warmup=25, rep=100, return_mode="median")
                    cell["rows"][name] = {
                        "fwd+bwd_ms": t_both, "bwd_ms": t_bwd,
                        "fwd+bwd_tflops": flops(batch, heads, seq, head_dim, causal, "fwd+bwd") / t_both / 1e9,
                        "bwd_tflops": flops(batch, heads, seq, head_dim, causal, "bwd") / t_bwd / 1e9}
                except Exception as exc:  # noqa: BLE001
                    cell["rows"][name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
                log(f"  d{head_dim} N={seq} causal={int(causal)} {name}: {fmt_row(cell['rows'][name])}")
            for backend, sdp in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
                try:
                    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

                    def sdpa_both(leaves=leaves, sdp=sdp):
                        with sdpa_kernel(sdp):
                            torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=causal).backward(
                                grad_out)

                    with sdpa_kernel(sdp):
                        out_sdpa = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=causal)

                    def sdpa_bwd(out_sdpa=out_sdpa):
                        out_sdpa.backward(grad_out, retain_graph=True)

                    t_both = do_bench(sdpa_both, warmup=25, rep=100, grad_to_none=leaves, return_mode="median")
                    t_bwd = do_bench(sdpa_bwd, warmup=25, rep=100, grad_to_none=leaves, return_mode="median")
                    cell[backend] = {
                        "fwd+bwd_ms": t_both, "bwd_ms": t_bwd,
                        "fwd+bwd_tflops": flops(batch, heads, seq, head_dim, causal, "fwd+bwd") / t_both / 1e9,
                        "bwd_tflops": flops(batch, heads, seq, head_dim, causal, "bwd") / t_bwd / 1e9}
                    del out_sdpa
                except Exception as exc:  # noqa: BLE001
                    cell[backend] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
                log(f"  d{head_dim} N={seq} causal={int(causal)} sdpa-{backend}: {fmt_row(cell[backend])}")
            results.append(cell)
            del q, k, v, grad_out, o, lse
            torch.cuda.empty_cache()
    return results


def fmt_row(r: dict) -> str:
    if "error" in r:
        return f"FAILED {r['error']}"
    return (f"fwd+bwd {r['fwd+bwd_ms']:.3f} ms = {r['fwd+bwd_tflops']:.0f} TFLOPS, "
            f"bwd {r['bwd_ms']:.3f} ms = {r['bwd_tflops']:.0f} TFLOPS")


def summary_table(cells: list[dict]) -> str:
    """D, causal, N, each row's fwd+bwd TFLOPS (r0 = the table's row), cuDNN, FA2, best row / FA2."""
    lines = []
    for head_dim in sorted({c["head_dim"] for c in cells}):
        group = [c for c in cells if c["head_dim"] == head_dim]
        names = list(group[0]["rows"])
        lines.append(f"head dim {head_dim}: " + "; ".join(f"r{i} = {n}" for i, n in enumerate(names)))
        header = ["D", "causal", "N", *[f"r{i}" for i in range(len(names))], "cudnn", "fa2", "best/fa2", "best"]
        lines.append(" ".join(f"{h:>7}" for h in header))
        for c in group:
            vals = [c["rows"][n].get("fwd+bwd_tflops") for n in names]
            fa2 = c.get("flash", {}).get("fwd+bwd_tflops")
            cudnn = c.get("cudnn", {}).get("fwd+bwd_tflops")
            ok = [(v, i) for i, v in enumerate(vals) if v is not None]
            best, best_i = max(ok) if ok else (None, None)
            cols = [head_dim, int(c["causal"]), c["seq"], *vals, cudnn, fa2,
                    (best / fa2) if best and fa2 else None, f"r{best_i}" if best_i is not None else "-"]
            lines.append(" ".join(f"{x:>7.0f}" if isinstance(x, float) and not (0 < x < 5) else
                                  f"{x:>7.2f}" if isinstance(x, float) else f"{str(x) if x is not None else '-':>7}"
                                  for x in cols))
    lines.append("(fwd+bwd TFLOPS; the JSON also holds backward-alone times)")
    return "\n".join(lines)


def gpu_main(args) -> None:
    import multiprocessing as mp

    import torch
    import triton

    started = time.time()

    def log(msg):
        print(f"[{time.time() - started:6.1f} s] {msg}", flush=True)

    log(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    head_dims = args.head_dims
    tasks = [(d, row) for d in head_dims for row in rows_for(d)]
    checks = {}
    with mp.get_context("spawn").Pool(min(args.workers, len(tasks))) as pool:
        for res in pool.starmap(check_row, tasks, chunksize=1):
            checks[(res["head_dim"], res["row"])] = res
    log(f"compiled and checked {len(tasks)} rows")
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "check_shape": CHECK_SHAPE, "checks": list(checks.values()), "timings": []}
    for head_dim in head_dims:
        rows = []
        for i, row in enumerate(rows_for(head_dim)):
            res = checks[(head_dim, row_name(row))]
            spills = max((s["spills"] for ks in res["kernels"].values() for s in ks), default=0)
            regs = {w: [s["regs"] for s in ks] for w, ks in res["kernels"].items()}
            shared = {w: [s["shared"] for s in ks] for w, ks in res["kernels"].items()}
            tag = "table row" if i == 0 else f"candidate {i}"
            if not res["ok"]:
                log(f"d{head_dim} {tag} {row_name(row)}: DROPPED ({'; '.join(res['errors'])})")
                continue
            log(f"d{head_dim} {tag} {row_name(row)}: gradients ok; regs {regs}, spills {spills}, shared {shared}")
            if spills and i > 0 and args.drop_spilling:
                log(f"d{head_dim} {tag} {row_name(row)}: DROPPED (spills registers)")
                continue
            rows.append(row)
        batch, heads = args.batch, args.heads
        if head_dim == 256 and args.batch_256:
            batch, heads = args.batch_256, args.heads_256
        log(f"timing d{head_dim}: {len(rows)} rows, batch {batch}, {heads} heads, N {args.seqs}")
        report["timings"] += time_rows(head_dim, rows, batch, heads, args.seqs, log)
    out = args.out or (os.path.join(os.environ["OUT"], "backward_tiles.json") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
        log(f"wrote {out}")
    log("done")
    print(summary_table(report["timings"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile-only", action="store_true", help="sm90 compile report, no GPU needed")
    parser.add_argument("--extra-tiles", action="store_true", help="--compile-only: also EXTRA_TILES_256 at d256")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--batch-256", type=int, default=0, help="batch at head dim 256 (default: --batch)")
    parser.add_argument("--heads-256", type=int, default=16, help="heads at head dim 256 with --batch-256")
    parser.add_argument("--workers", type=int, default=8, help="processes compiling and checking rows")
    parser.add_argument("--drop-spilling", action="store_true", help="time no candidate that spills registers")
    parser.add_argument("--out", default=None, help="JSON file (default $OUT/backward_tiles.json when OUT is set)")
    args = parser.parse_args()
    if args.compile_only:
        results = compile_report(args.head_dims, args.extra_tiles)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
        return
    gpu_main(args)


if __name__ == "__main__":
    main()
