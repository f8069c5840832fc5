"""Host time per call (no sync) of the decode path's pieces: where eager decode's per-layer microseconds go.

Usage (GPU): python3 scripts/host_overhead.py [--profile]
"""

import cProfile
import pstats
import sys
import time

import torch

import flashpatch
from flashpatch.kernels import decode as decode_module
from flashpatch.kernels import launch
from flashpatch.kernels import TileConfig, flash_decode_forward
from flashpatch.ops import _check_inputs, _forward


def host_us(fn, n=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return host


def recorded_call(launcher, run):
    """The (grid, args, constexprs) of the launcher's next planned call made by `run`."""
    seen = []
    original = type(launcher).launch_planned

    def spy(self, variants, grid, tensors, scalars, constexprs, *rest, **kw):
        if self is launcher:
            seen.append((grid, (*tensors, *scalars), constexprs))
        return original(self, variants, grid, tensors, scalars, constexprs, *rest, **kw)

    type(launcher).launch_planned = spy
    try:
        run()
    finally:
        type(launcher).launch_planned = original
    return seen[-1]


q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
k, v = (torch.randn(1, 32, 4096, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
cfg = TileConfig(16, 64, 4, 3)


def decode(splits, need_lse=True):
    return lambda: flash_decode_forward(q, k, v, causal=True, scale=0.088, key_padding_mask=None, seqused_k=None,
                                        config=cfg, num_splits=splits, need_lse=need_lse)


launcher = decode_module._launch_decode
grid, args, constexprs = recorded_call(launcher, decode(4))
key = launcher.key(args, constexprs, launch._current_device())
compiled, constexpr_values = launcher.compiled[key]
full_grid = (*grid, 1, 1)[:3]
stream = torch.cuda.current_stream().cuda_stream
guard = torch.cuda.device(q.device)

cases = {
    "sdpa (default)": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
    "flashpatch.attention": lambda: flashpatch.attention(q, k, v, causal=True),
    "ops._forward": lambda: _forward(q, k, v, True, 0.088, None),
    "flash_decode_forward, 4 splits": decode(4),
    "flash_decode_forward, 4 splits, no lse": decode(4, need_lse=False),
    "flash_decode_forward, 1 split": decode(1),
    "flash_decode_forward, 1 split, no lse": decode(1, need_lse=False),
    "_check_inputs": lambda: _check_inputs(q, k, v, None),
    "CachedLauncher call (decode)": lambda: launcher(grid, *args, **constexprs),
    "CachedLauncher.key": lambda: launcher.key(args, constexprs),
    "compiled[grid](...)": lambda: compiled[full_grid](*args, *constexpr_values),
    "compiled.run(...) direct": lambda: compiled.run(*full_grid, stream, compiled.function, compiled.packed_metadata,
                                                     None, None, None, *args, *constexpr_values),
    "torch.empty (cuda)": lambda: torch.empty((4, 1, 1, 32, 128), device="cuda"),
    "torch.cuda.device guard": lambda: (guard.__enter__(), guard.__exit__(None, None, None)),
    "torch.cuda.current_device()": torch.cuda.current_device,
    "current_stream().cuda_stream": lambda: torch.cuda.current_stream().cuda_stream,
}
print(f"decode kernel: {len(args)} runtime args")
for name, fn in cases.items():
    try:
        print(f"{name:34s} {host_us(fn):8.1f} us/call (host)", flush=True)
    except Exception as exc:  # the direct run signature is Triton-version specific
        print(f"{name:34s} failed: {type(exc).__name__}: {str(exc)[:150]}", flush=True)

if "--profile" in sys.argv:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(2000):
        flashpatch.attention(q, k, v, causal=True)
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
