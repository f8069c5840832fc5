"""H100: the TMA forward with and without Triton's warp specialisation of its main loop (issue 8), vs cuDNN.

Usage: python3 scripts/gpu_ws_probe.py   (prints TFLOPS and the max error against float32 SDPA math)
"""

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from flashpatch.kernels import TileConfig
from flashpatch.kernels.forward_tma import flash_attn_forward_tma

print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
for head_dim, cfg in ((128, TileConfig(128, 128, 8, 3, tma=True)), (128, TileConfig(128, 64, 8, 3, tma=True)),
                      (64, TileConfig(128, 64, 8, 3, tma=True))):
    for causal in (False, True):
        for n in (2048, 8192):
            q, k, v = (torch.randn(8, 32, n, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            flops = 4 * 8 * 32 * n * n * head_dim / (2 if causal else 1)
            ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
            row = [f"d{head_dim} {'causal' if causal else 'full'} N{n} {cfg.block_m}x{cfg.block_n}"]
            for ws in (False, True):
                def fn(ws=ws):
                    return flash_attn_forward_tma(q, k, v, causal=causal, scale=head_dim ** -0.5, config=cfg,
                                                  warp_specialize=ws)
                try:
                    err = (fn()[0].float() - ref).abs().max().item()
                    ms = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
                    row.append(f"ws={ws}: {flops / ms / 1e9:.0f} TFLOPS err {err:.1e}")
                except Exception as exc:
                    row.append(f"ws={ws}: {type(exc).__name__} {str(exc)[:80]}")
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                ms = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=causal), warmup=10, rep=50, return_mode="median")
            row.append(f"cudnn {flops / ms / 1e9:.0f}")
            print(" | ".join(row), flush=True)
