"""H100: the FP8 (e4m3) forward against our bf16 forward and SDPA's cuDNN backend, and its accuracy (issue 8 stretch).

Usage: python3 scripts/gpu_fp8.py [--sweep]
Speed: batch 8, 32 heads, N 2048 and 8192, head dims 64 and 128, causal and not; TFLOPS count 4·B·H·N²·D (halved
when causal). `fp8 kernel` times the kernel on inputs quantized beforehand (as FA3 reports it); `fp8 op` includes the
per-tensor quantization of q, k, v (`flashpatch.attention_fp8`). `bf16` is `flashpatch.attention` (autotuned).
Accuracy: batch 1, 8 heads, N 2048, rms and max error against float64, relative to the output's rms.
"""

import sys

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import flashpatch
from flashpatch.kernels import TileConfig, flash_attn_forward_fp8, fp8_candidates, quantize_per_tensor
from flashpatch.reference import reference_attention

SWEEP = [TileConfig(128, 128, 8, 3), TileConfig(128, 64, 8, 3), TileConfig(128, 128, 8, 4), TileConfig(128, 128, 8, 2),
         TileConfig(64, 128, 4, 3), TileConfig(128, 256, 8, 2)]


def tflops(ms, n, d, causal, batch=8, heads=32):
    return 4 * batch * heads * n * n * d / (2 if causal else 1) / ms / 1e9


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
rows = []
for d in (64, 128):
    for causal in (False, True):
        for n in (2048, 8192):
            q, k, v = (torch.randn(8, 32, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            q8, qs = quantize_per_tensor(q)
            k8, ks = quantize_per_tensor(k)
            vt8, vs = quantize_per_tensor(v, transpose=True)
            descale = torch.cat([qs, ks, vs])
            cell = {"d": d, "causal": causal, "n": n}
            configs = SWEEP if "--sweep" in sys.argv else fp8_candidates("sm90", d)
            for cfg in configs:
                try:
                    ms = bench(lambda: flash_attn_forward_fp8(q8, k8, vt8, descale, causal=causal, scale=d ** -0.5,
                                                              config=cfg))
                    cell[f"fp8 {cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}"] = tflops(ms, n, d, causal)
                except Exception as exc:  # a tile that does not fit: name it and go on
                    print(f"d{d} N{n} {cfg}: {type(exc).__name__}", flush=True)
            with torch.no_grad():
                cell["fp8 op"] = tflops(bench(lambda: flashpatch.attention_fp8(q, k, v, causal=causal)), n, d, causal)
                cell["bf16"] = tflops(bench(lambda: flashpatch.attention(q, k, v, causal=causal)), n, d, causal)
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                cell["cudnn"] = tflops(bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=causal)), n, d, causal)
            print(" ".join(f"{key}={val:.0f}" if isinstance(val, float) else f"{key}={val}"
                           for key, val in cell.items()), flush=True)
            rows.append(cell)
            del q, k, v, q8, k8, vt8

print("\naccuracy (B1 H8 N2048, bf16 inputs; error / rms of the float64 output)")
acc_rows = []
for d in (64, 128):
    for causal in (False, True):
        q, k, v = (torch.randn(1, 8, 2048, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        ref = reference_attention(q.double(), k.double(), v.double(), causal=causal)
        scale = ref.pow(2).mean().sqrt()
        with torch.no_grad():
            outs = {"fp8": flashpatch.attention_fp8(q, k, v, causal=causal),
                    "bf16": flashpatch.attention(q, k, v, causal=causal)}
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            outs["cudnn bf16"] = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        for name, out in outs.items():
            err = out.double() - ref
            acc_rows.append((d, causal, name, (err.pow(2).mean().sqrt() / scale).item(),
                             (err.abs().max() / scale).item()))

best = lambda c: max(v for key, v in c.items() if key.startswith("fp8 ") and key != "fp8 op")  # noqa: E731
print("\n| D | causal | N | fp8 kernel TFLOPS | fp8 op TFLOPS | bf16 TFLOPS | cuDNN bf16 TFLOPS | fp8 kernel / bf16 | "
      "fp8 kernel / cuDNN |")
print("|---|---|---|---|---|---|---|---|---|")
for c in rows:
    print(f"| {c['d']} | {c['causal']} | {c['n']} | {best(c):.0f} | {c['fp8 op']:.0f} | {c['bf16']:.0f} | "
          f"{c['cudnn']:.0f} | {best(c) / c['bf16']:.2f}x | {best(c) / c['cudnn']:.2f}x |")
print("\n| D | causal | implementation | rms error / rms | max error / rms |")
print("|---|---|---|---|---|")
for d, causal, name, rms, mx in acc_rows:
    print(f"| {d} | {causal} | {name} | {rms:.2e} | {mx:.2e} |")
