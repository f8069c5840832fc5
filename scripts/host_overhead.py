"""Host time per call (no sync) of the decode path's pieces: where eager decode's per-layer microseconds go."""

import cProfile
import pstats
import time

import torch

import flashpatch
from flashpatch.kernels import TileConfig, flash_decode_forward

q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
k, v = (torch.randn(1, 32, 1024, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
cfg = TileConfig(16, 64, 4, 3)


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


cases = {
    "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
    "flashpatch.attention": lambda: flashpatch.attention(q, k, v, causal=True),
    "flash_decode_forward": lambda: flash_decode_forward(q, k, v, causal=True, scale=0.088, key_padding_mask=None,
                                                         seqused_k=None, config=cfg, num_splits=4),
    "4x torch.empty": lambda: [torch.empty((4, 1, 1, 32, 128), device="cuda") for _ in range(4)],
    "torch.cuda.device guard": lambda: torch.cuda.device(q.device).__enter__(),
}
for name, fn in cases.items():
    print(f"{name:28s} {host_us(fn):8.1f} us/call (host)", flush=True)

prof = cProfile.Profile()
prof.enable()
for _ in range(2000):
    flashpatch.attention(q, k, v, causal=True)
prof.disable()
torch.cuda.synchronize()
pstats.Stats(prof).sort_stats("tottime").print_stats(25)
