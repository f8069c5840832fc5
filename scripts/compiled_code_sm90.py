"""What the portable forward kernel compiles to on sm90, without a GPU (Triton's bundled ptxas).

Compiles `_flash_fwd_kernel` for an H100 target with the specialisations a real bf16 launch gets (16-byte aligned
pointers and strides, unit inner strides, no masks) and counts, in the PTX: wgmma instructions and their waits,
cp.async (pipelined loads) vs TMA bulk copies, and exp2. Usage: python3 scripts/compiled_code_sm90.py [OUT_DIR]
"""

import os
import re
import sys
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from flashpatch.kernels.forward import _flash_fwd_kernel as kernel

POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "LSE": "*fp32", "KPM": "*fp32",
            "SEQUSED": "*fp32", "SEG": "*fp32", "SINKS": "*fp32"}
UNALIGNED = ("stride_mb", "stride_mn", "stride_sb", "stride_sp")  # unused mask strides: 0 or 1 in a plain call


def compile_sm90(block_m: int, block_n: int, num_warps: int, num_stages: int, causal: bool, head_dim: int = 128):
    constexprs = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=head_dim, CAUSAL=causal, HAS_KPM=False,
                      HAS_SEQUSED=False, HAS_SEG=False, EVEN_D=True, DOT_PRECISION="tf32", DROPOUT=False,
                      SOFTCAP=False, WINDOW=False, HAS_SINKS=False, stride_qd=1, stride_kd=1, stride_vd=1, stride_od=1)
    names = kernel.arg_names
    signature = {n: "constexpr" if n in constexprs else POINTERS.get(n, "fp32" if n in ("qk_scale", "dropout_p", "cap_log2")
                                                                     else "i32") for n in names}
    aligned = [n for n in names if n in POINTERS or (n.startswith("stride_") and n not in constexprs
                                                     and n not in UNALIGNED)]
    source = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def census(ptx: str) -> dict:
    waits = Counter(re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx))
    return {"wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
            "wgmma waits (pending allowed: count)": dict(sorted(waits.items())),
            "cp.async (16 B)": len(re.findall(r"cp\.async\.cg\.shared\.global", ptx)),
            "TMA bulk copies": len(re.findall(r"cp\.async\.bulk", ptx)),
            "ex2": len(re.findall(r"ex2\.approx", ptx))}


if __name__ == "__main__":
    out_dir = sys.argv[1] if len(sys.argv) > 1 else None
    print(f"triton {triton.__version__}, target sm90, bf16, head dim 128")
    for cfg in [(128, 64, 8, 3, False), (128, 64, 8, 3, True), (128, 128, 8, 3, False)]:
        compiled = compile_sm90(*cfg)
        print(f"BLOCK_M={cfg[0]} BLOCK_N={cfg[1]} warps={cfg[2]} stages={cfg[3]} causal={cfg[4]}: "
              f"shared {compiled.metadata.shared} B", census(compiled.asm["ptx"]))
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, "fwd-{}-{}-{}-{}-{}.ptx".format(*cfg)), "w") as f:
                f.write(compiled.asm["ptx"])
