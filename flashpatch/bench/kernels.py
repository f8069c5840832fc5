"""Kernel benchmark: flashpatch's forward vs SDPA's backends and FlexAttention, side by side in one run.

Times with triton.testing.do_bench (CUDA events, median after warm-up). TFLOPS count
4 * B * H * Sq * Sk * D for the forward, half of it when causal.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch

SEED_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
# SDPA's math backend is left out: unfused, it ran out of memory at 16K tokens and read KV caches at 0.5 TB/s at
# most where cuDNN reached 4.7 (H200, the run of BENCHMARKS §3), so its cells took most of a table's time.
SDPA_BACKENDS = ("flash", "cudnn", "efficient")


@dataclass
class KernelRow:
    impl: str
    head_dim: int
    seq_len: int
    causal: bool
    ms: float | None
    tflops: float | None
    peak_mib: float | None
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def attention_flops(batch, heads, seq_q, seq_k, head_dim, causal) -> float:
    flops = 4.0 * batch * heads * seq_q * seq_k * head_dim
    return flops / 2 if causal else flops


def _sdpa_fn(backend: str, q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
              "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[backend]
    gqa = k.shape[1] != q.shape[1]  # K/V heads shared by groups of query heads, read without copies

    def run():
        with sdpa_kernel(chosen):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    return run


_compiled_flex = None


def _flex_fn(q, k, v, causal):
    global _compiled_flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _compiled_flex is None:
        # One compile per shape: without room for them dynamo falls back to the unfused (O(N^2)) path.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    block_mask = None
    if causal:
        block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, q.shape[2], k.shape[2],
                                       device=q.device)
    return lambda: _compiled_flex(q, k, v, block_mask=block_mask)


def make_fn(impl: str, q, k, v, causal):
    import flashpatch

    if impl == "flashpatch":
        return lambda: flashpatch.attention(q, k, v, causal=causal)
    if impl == "flashpatch-fp8":  # per-tensor e4m3 quantization of q, k, v included
        return lambda: flashpatch.attention_fp8(q, k, v, causal=causal)
    if impl == "flex":
        return _flex_fn(q, k, v, causal)
    if impl.startswith("sdpa-"):
        return _sdpa_fn(impl.removeprefix("sdpa-"), q, k, v, causal)
    raise ValueError(f"unknown implementation {impl!r}")


def time_cell(fn, flops: float) -> tuple[float, float, float]:
    """(ms, TFLOPS, peak MiB above what was allocated before) for one callable."""
    import triton

    fn()  # compile / plan outside the timing
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return ms, flops / (ms * 1e-3) / 1e12, peak


def bench_forward(impls, lengths=SEED_LENGTHS, head_dims=(64, 128), causals=(False, True), batch=8, heads=32,
                  dtype=torch.bfloat16, progress=None) -> list[KernelRow]:
    rows = []
    for head_dim in head_dims:
        for causal in causals:
            for n in lengths:
                q, k, v = (torch.randn(batch, heads, n, head_dim, device="cuda", dtype=dtype) for _ in range(3))
                flops = attention_flops(batch, heads, n, n, head_dim, causal)
                for impl in impls:
                    try:
                        ms, tflops, peak = time_cell(make_fn(impl, q, k, v, causal), flops)
                        rows.append(KernelRow(impl, head_dim, n, causal, ms, tflops, peak))
                    except Exception as exc:  # OOM or a backend that refuses the shape: record, go on
                        reason = "OOM" if isinstance(exc, torch.OutOfMemoryError) else f"{type(exc).__name__}: {exc}"
                        rows.append(KernelRow(impl, head_dim, n, causal, None, None, None, reason.splitlines()[0][:120]))
                    with contextlib.suppress(Exception):
                        torch.cuda.empty_cache()
                    if progress is not None:
                        progress()
                del q, k, v
    return rows


def markdown_table(rows: list[KernelRow], impls) -> str:
    """One line per (head_dim, causal, N): TFLOPS per implementation and flashpatch's ratio to each."""
    others = [i for i in impls if i != "flashpatch"]
    head = "| D | causal | N | " + " | ".join(f"{i} TFLOPS" for i in impls) + " | " + \
        " | ".join(f"vs {i}" for i in others) + " | flashpatch ms | flashpatch peak MiB |"
    lines = [head, "|" + "---|" * (3 + len(impls) + len(others) + 2)]
    keyed = {(r.impl, r.head_dim, r.causal, r.seq_len): r for r in rows}
    for (d, c, n) in sorted({(r.head_dim, r.causal, r.seq_len) for r in rows}):
        cells = [keyed.get((i, d, c, n)) for i in impls]
        fmt = [f"{r.tflops:.0f}" if r and r.tflops else (r.error.split(':')[0] if r and r.error else "-") for r in cells]
        ours = keyed.get(("flashpatch", d, c, n))
        ratios = []
        for i in others:
            r = keyed.get((i, d, c, n))
            ratios.append(f"{r.ms / ours.ms:.2f}x" if ours and ours.ms and r and r.ms else "-")
        ms = f"{ours.ms:.3f}" if ours and ours.ms else "-"
        peak = f"{ours.peak_mib:.0f}" if ours and ours.peak_mib is not None else "-"
        lines.append(f"| {d} | {c} | {n} | " + " | ".join(fmt) + " | " + " | ".join(ratios) + f" | {ms} | {peak} |")
    return "\n".join(lines)


def tile_sweep(candidates, lengths=(2048, 8192), head_dims=(64, 128), batch=8, heads=32, dtype=torch.bfloat16):
    """Time every candidate TileConfig directly through the launcher: evidence for the tile table."""
    import triton

    from flashpatch.kernels import flash_attn_forward

    results = []
    for head_dim in head_dims:
        for causal in (False, True):
            for n in lengths:
                q, k, v = (torch.randn(batch, heads, n, head_dim, device="cuda", dtype=dtype) for _ in range(3))
                flops = attention_flops(batch, heads, n, n, head_dim, causal)
                for cfg in candidates:
                    def fn(cfg=cfg):
                        return flash_attn_forward(q, k, v, causal=causal, scale=1 / math.sqrt(head_dim),
                                                  key_padding_mask=None, config=cfg)
                    try:
                        fn()
                        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                        results.append((head_dim, causal, n, cfg, flops / (ms * 1e-3) / 1e12))
                    except Exception as exc:
                        results.append((head_dim, causal, n, cfg, f"{type(exc).__name__}"))
    return results


BACKWARD_IMPLS = ("flashpatch", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex")


def bench_backward(impls=BACKWARD_IMPLS, lengths=(2048, 8192), head_dims=(64, 128), causals=(False, True), batch=8,
                   heads=32, dtype=torch.bfloat16, backward_only=False, progress=None) -> list[KernelRow]:
    """Forward + backward (or, backward_only, the backward of a retained graph). TFLOPS count 3.5x (2.5x) the
    forward's FLOPs, FA's convention."""
    rows = []
    for head_dim in head_dims:
        for causal in causals:
            for n in lengths:
                q, k, v = (torch.randn(batch, heads, n, head_dim, device="cuda", dtype=dtype, requires_grad=True)
                           for _ in range(3))
                grad = torch.randn(batch, heads, n, head_dim, device="cuda", dtype=dtype)
                flops = (2.5 if backward_only else 3.5) * attention_flops(batch, heads, n, n, head_dim, causal)
                for impl in impls:
                    try:
                        forward = make_fn(impl, q, k, v, causal)
                        if backward_only:
                            out = forward()
                            step = lambda out=out: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
                        else:
                            step = lambda forward=forward: torch.autograd.grad(forward(), (q, k, v), grad)
                        ms, tflops, peak = time_cell(step, flops)
                        rows.append(KernelRow(impl, head_dim, n, causal, ms, tflops, peak))
                    except Exception as exc:
                        reason = "OOM" if isinstance(exc, torch.OutOfMemoryError) else f"{type(exc).__name__}: {exc}"
                        rows.append(KernelRow(impl, head_dim, n, causal, None, None, None, reason.splitlines()[0][:120]))
                    out = step = None
                    with contextlib.suppress(Exception):
                        torch.cuda.empty_cache()
                    if progress is not None:
                        progress()
                del q, k, v, grad
    return rows


DECODE_CACHES = (1024, 4096, 16384, 65536, 131072)


@dataclass
class DecodeRow:
    impl: str
    batch: int
    cache: int
    us: float | None
    tb_s: float | None  # bytes of K and V read / time
    error: str | None = None
    kv_heads: int = 32

    def to_dict(self) -> dict:
        return asdict(self)


def kv_bytes(batch, heads_k, cache, head_dim, element_size=2) -> float:
    return 2.0 * batch * heads_k * cache * head_dim * element_size


def bench_decode(impls, caches=DECODE_CACHES, batches=(1, 8, 32), heads=32, head_dim=128, dtype=torch.bfloat16,
                 max_kv_gib=66.0, progress=None, cuda_graph=False, kv_heads=(32, 8)) -> list[DecodeRow]:
    """One query token against a KV cache of N: time and TB/s of K/V read (caches over max_kv_gib are skipped),
    for each count of K/V heads in kv_heads (32 of 32: MHA; 8: Llama-3's GQA groups of 4).

    cuda_graph=True times replays of a CUDA graph of the call (`do_bench_cudagraph`): GPU time alone, without
    any backend's host launch cost; False times eager calls back to back, host cost included where it dominates.
    """
    import triton

    rows = []
    for heads_k, batch, n in ((h, b, n) for h in kv_heads for b in batches for n in caches):
        nbytes = kv_bytes(batch, heads_k, n, head_dim)
        if nbytes / 2**30 > max_kv_gib:
            rows += [DecodeRow(i, batch, n, None, None, f"skipped: K/V {nbytes / 2**30:.0f} GiB", heads_k)
                     for i in impls]
            continue
        q = torch.randn(batch, heads, 1, head_dim, device="cuda", dtype=dtype)
        k, v = (torch.randn(batch, heads_k, n, head_dim, device="cuda", dtype=dtype) for _ in range(2))
        for impl in impls:
            try:
                fn = make_fn(impl, q, k, v, False)  # one query at the end of the cache: causal = full
                fn()
                if cuda_graph:
                    ms = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
                else:
                    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                rows.append(DecodeRow(impl, batch, n, ms * 1e3, nbytes / (ms * 1e-3) / 1e12, None, heads_k))
            except Exception as exc:
                reason = "OOM" if isinstance(exc, torch.OutOfMemoryError) else f"{type(exc).__name__}: {exc}"
                rows.append(DecodeRow(impl, batch, n, None, None, reason.splitlines()[0][:120], heads_k))
            if progress is not None:
                progress()
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def decode_markdown(rows: list[DecodeRow], impls) -> str:
    others = [i for i in impls if i != "flashpatch"]
    lines = ["| KV heads | batch | cache | " + " | ".join(f"{i} TB/s" for i in impls) + " | "
             + " | ".join(f"vs {i}" for i in others) + " | flashpatch us |",
             "|" + "---|" * (4 + len(impls) + len(others))]
    keyed = {(r.impl, r.kv_heads, r.batch, r.cache): r for r in rows}
    for cell in sorted({(r.kv_heads, r.batch, r.cache) for r in rows}, key=lambda c: (-c[0], c[1], c[2])):
        found = [keyed.get((i, *cell)) for i in impls]
        fmt = [f"{r.tb_s:.2f}" if r and r.tb_s else (r.error.split(':')[0] if r and r.error else "-") for r in found]
        ours = keyed.get(("flashpatch", *cell))
        ratios = [f"{keyed[(i, *cell)].us / ours.us:.2f}x" if ours and ours.us and keyed.get((i, *cell))
                  and keyed[(i, *cell)].us else "-" for i in others]
        us = f"{ours.us:.1f}" if ours and ours.us else "-"
        lines.append("| " + " | ".join(map(str, cell)) + " | " + " | ".join(fmt) + " | " + " | ".join(ratios)
                     + f" | {us} |")
    return "\n".join(lines)


def decode_sweep(candidates, cases=((1, 1024), (1, 4096), (1, 131072), (8, 16384), (32, 4096)), heads=32,
                 head_dim=128, dtype=torch.bfloat16, cuda_graph=True):
    """TB/s of each candidate (decode TileConfig, waves per SM and minimum key blocks per split, which set the
    split count, and optionally the merge's unroll factor): evidence for DECODE_TABLE. cuda_graph=True times GPU
    work alone (see `bench_decode`)."""
    import triton

    from flashpatch.kernels import decode_splits, flash_decode_forward

    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    results = []
    for batch, n in cases:
        q = torch.randn(batch, heads, 1, head_dim, device="cuda", dtype=dtype)
        k, v = (torch.randn(batch, heads, n, head_dim, device="cuda", dtype=dtype) for _ in range(2))
        for cfg, waves, min_blocks, *unroll in candidates:
            splits = decode_splits(batch * heads, 1, n, cfg.block_n, sm_count, waves, min_blocks)

            def fn(cfg=cfg, splits=splits, q=q, k=k, v=v, unroll=unroll[0] if unroll else None):
                return flash_decode_forward(q, k, v, causal=True, scale=head_dim ** -0.5, key_padding_mask=None,
                                            seqused_k=None, config=cfg, num_splits=splits, need_lse=False,
                                            merge_unroll=unroll)
            try:
                fn()
                if cuda_graph:
                    ms = triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
                else:
                    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                results.append((batch, n, cfg, waves, min_blocks, *unroll, splits,
                                kv_bytes(batch, heads, n, head_dim) / (ms * 1e-3) / 1e12))
            except Exception as exc:
                results.append((batch, n, cfg, waves, min_blocks, *unroll, splits, f"{type(exc).__name__}"))
        del q, k, v
    return results


# `bench kernels --tables`: forward, forward + backward, backward alone, decode (eager calls and CUDA-graph replays).
KERNEL_TABLES = ("forward", "fwd-bwd", "backward", "decode")


def run_kernel_tables(lengths=None, head_dims=(64, 128), progress=None, on_table=None, tables=KERNEL_TABLES
                      ) -> tuple[list[tuple[str, str]], dict]:
    """`flashpatch bench kernels`: the `tables` of KERNEL_TABLES asked for, in that order, each against SDPA's
    backends and FlexAttention. Returns ([(title, markdown table)], JSON data). `progress(0, total)` is called
    first, then `progress()` per cell; `on_table(title, table, data)` as each table is done (data: the rows so
    far, "partial" true until the last, "kernels_used": what served flashpatch's cells and how its tiles were
    chosen), so a run cut short keeps what it measured."""
    import flashpatch

    impls = ["flashpatch"] + [f"sdpa-{b}" for b in SDPA_BACKENDS] + ["flex"]
    decode_impls = impls[:-1]  # FlexAttention would compile per cache length
    if torch.cuda.get_device_capability() >= (9, 0):
        impls.append("flashpatch-fp8")  # the FP8 forward, quantization included (Hopper)
    lengths = list(lengths or SEED_LENGTHS)
    batches = (1, 8, 32)
    cells = len(lengths) * len(head_dims) * 2
    step = progress or (lambda *args: None)
    step(0, cells * (len(impls) * ("forward" in tables) + len(BACKWARD_IMPLS) * (("fwd-bwd" in tables)
                                                                           + ("backward" in tables)))
         + 2 * 2 * len(DECODE_CACHES) * len(batches) * len(decode_impls) * ("decode" in tables))
    grid = dict(lengths=lengths, head_dims=head_dims, progress=step)
    sections = [
        ("forward", "rows", "Forward, batch 8, 32 heads, bf16 (TFLOPS):",
         lambda: bench_forward(impls, **grid), lambda rows: markdown_table(rows, impls)),
        ("fwd-bwd", "forward_backward_rows", "Forward + backward (TFLOPS count 3.5x the forward's FLOPs):",
         lambda: bench_backward(**grid), lambda rows: markdown_table(rows, BACKWARD_IMPLS)),
        ("backward", "backward_rows", "Backward alone (2.5x the forward's FLOPs):",
         lambda: bench_backward(backward_only=True, **grid), lambda rows: markdown_table(rows, BACKWARD_IMPLS)),
        ("decode", "decode_rows", "Decode, one query token, 32 heads (32 or 8 K/V heads), head dim 128, bf16 (TB/s of K/V read), "
         "calls back to back "
         "(host launch cost included):", lambda: bench_decode(decode_impls, batches=batches, progress=step),
         lambda rows: decode_markdown(rows, decode_impls)),
        ("decode", "decode_graph_rows", "The same, timed as CUDA-graph replays (GPU time alone, every backend alike):",
         lambda: bench_decode(decode_impls, batches=batches, progress=step, cuda_graph=True),
         lambda rows: decode_markdown(rows, decode_impls)),
    ]
    sections = [section for section in sections if section[0] in tables]
    done, data = [], {"partial": True}
    for _, key, title, measure, render in sections:
        rows = measure()
        done.append((title, render(rows)))
        data[key] = [r.to_dict() for r in rows]
        data["kernels_used"] = flashpatch.kernels_used()  # each kind of call's kernel, tile and tuning timings
        data["partial"] = key != sections[-1][1]
        if on_table:
            on_table(title, done[-1][1], data)
    return done, data
