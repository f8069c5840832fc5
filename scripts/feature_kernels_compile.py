"""The sliding-window / softcap / sink variants of the portable kernels, compiled without a GPU (Triton's bundled
ptxas), against the plain variants.

  python3 scripts/feature_kernels_compile.py ptx [REV]
      Compiles the plain variants (no window, softcap or sinks) of the forward, dK/dV, dQ and decode kernels for sm90
      from the working tree and from git revision REV (default HEAD), and compares their PTX with parameter
      declarations and loads, debug locations and register numbers taken out: "identical" means the same
      instructions in the same order (the new kernel parameters are never read on the plain path).

  python3 scripts/feature_kernels_compile.py resources
      For each family's forward rows (TILE_TABLE, pointer TUNE_ALTERNATIVES), backward rows and decode rows, the
      shared memory of the plain variant and of the variant with every feature (window + softcap + sinks), against
      the family's budget, and on sm90 registers and spilled bytes (ptxas' log).
"""

import contextlib
import difflib
import importlib
import io
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

SMEM = {"sm90": 227 * 1024, "sm80": 163 * 1024, "sm86": 99 * 1024}
CAPABILITY = {"sm90": 90, "sm80": 80, "sm86": 86}
FLOATS = ("qk_scale", "sm_scale", "dropout_p", "cap_log2")
POINTERS = {"LSE": "*fp32", "DELTA": "*fp32", "WORK": "*fp32", "COUNTERS": "*fp32", "KPM": "*u8", "SEQUSED": "*i32",
            "SEG": "*i32", "SINKS": "*fp32"}


def compile_kernel(kernel, constexprs, family="sm90", num_warps=4, num_stages=2, log=False):
    """(compiled, ptxas log) for a bf16 call as a real launch specialises it: head-dim strides 1, 16-byte aligned
    pointers and other strides (mask strides excepted)."""
    names = kernel.arg_names
    unit = {n: 1 for n in names if re.fullmatch(r"stride_\w*d", n)}
    constexprs = {k: v for k, v in {**unit, **constexprs}.items() if k in names}
    signature = {n: "constexpr" if n in constexprs else POINTERS.get(n, "*bf16" if n.isupper() else
                                                                     ("fp32" if n in FLOATS else "i32"))
                 for n in names}
    aligned = [n for n in names if signature[n].startswith("*") or (
        n.startswith("stride_") and n not in constexprs and not n.startswith(("stride_m", "stride_s")))]
    source = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    out = io.StringIO()
    knobs.nvidia.dump_ptxas_log = log
    knobs.compilation.always_compile = log
    with contextlib.redirect_stdout(out):
        compiled = triton.compile(source, target=GPUTarget("cuda", CAPABILITY[family], 32),
                                  options=dict(num_warps=num_warps, num_stages=num_stages))
    return compiled, out.getvalue()


def instructions(ptx: str) -> list[str]:
    lines = []
    for line in ptx.split(".section")[0].splitlines():
        s = line.split("//")[0].strip()
        if not s or s.startswith((".param", "ld.param", ".entry", ".visible", ".loc", ".file", ".reg", "$L__tmp")):
            continue
        lines.append(re.sub(r"_param_\d+", "_param", s))
    names: dict = {}

    def rename(m):
        kind = m.group(1)
        return names.setdefault(m.group(0), f"%{kind}#{sum(1 for n in names if n.startswith('%' + kind))}")

    return [re.sub(r"%(r|rd|f|p|rs|hs|h|fd|b)\d+", rename, s) for s in lines]


def plain_variants():
    """(label, module name, kernel name, constexprs, num_warps, num_stages) of plain calls."""
    fwd = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=128, HAS_SEG=False, EVEN_D=True, DOT_PRECISION="tf32", DROPOUT=False,
               STORE_LSE=True)
    for causal in (False, True):
        for masked in (False, True):
            yield (f"forward causal={causal} masks={masked}", "forward", "_flash_fwd_kernel",
                   dict(fwd, CAUSAL=causal, HAS_KPM=masked, HAS_SEQUSED=masked), 8, 3)
    bwd = dict(BLOCK_D=128, HAS_KPM=False, HAS_SEG=False, DOT_PRECISION="tf32", DROPOUT=False)
    for causal in (False, True):
        for boundary in (False, True):
            yield (f"dkdv causal={causal} boundary={boundary}", "backward", "_flash_bwd_dkdv_kernel",
                   dict(bwd, BLOCK_M=64, BLOCK_N=128, CAUSAL=causal, BOUNDARY=boundary), 8, 3)
            yield (f"dq causal={causal} boundary={boundary}", "backward", "_flash_bwd_dq_kernel",
                   dict(bwd, BLOCK_M=128, BLOCK_N=64, CAUSAL=causal, BOUNDARY=boundary), 8, 3)
    for split in (False, True):
        yield (f"decode split={split}", "decode", "_flash_decode_kernel",
               dict(BLOCK_R=16, BLOCK_N=64, BLOCK_D=128, CAUSAL=True, HAS_KPM=False, HAS_SEQUSED=False, EVEN_D=True,
                    SPLIT=split, STORE_LSE=False, DOT_PRECISION="tf32", MERGE_UNROLL=4), 4, 4)


def compare_ptx(rev: str) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        package = os.path.join(tmp, "revkernels")
        os.makedirs(package)
        names = subprocess.run(["git", "-C", ROOT, "ls-tree", "--name-only", rev, "kernels/"], check=True,
                               capture_output=True, text=True).stdout.split()
        for path in names:
            if path.endswith(".py"):
                source = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:{path}"], check=True,
                                        capture_output=True, text=True).stdout
                with open(os.path.join(package, os.path.basename(path)), "w") as f:
                    f.write(source)
        sys.path.insert(0, tmp)
        same_everywhere = True
        for label, module, kernel, constexprs, warps, stages in plain_variants():
            old = getattr(importlib.import_module(f"revkernels.{module}"), kernel)
            new = getattr(importlib.import_module(f"kernels.{module}"), kernel)
            features = {n: False for n in ("SOFTCAP", "WINDOW", "HAS_SINKS")}
            a = instructions(compile_kernel(old, constexprs, num_warps=warps, num_stages=stages)[0].asm["ptx"])
            b = instructions(compile_kernel(new, {**constexprs, **features}, num_warps=warps,
                                            num_stages=stages)[0].asm["ptx"])
            print(f"{label}: {'identical' if a == b else 'DIFFERENT'} ({len(a)} / {len(b)} instructions)")
            if a != b:
                same_everywhere = False
                print("\n".join(list(difflib.unified_diff(a, b, lineterm=""))[:30]))
    return same_everywhere


def resources() -> None:
    from kernels import backward, decode, forward
    from kernels.config import BACKWARD_TABLE, DECODE_TABLE, TILE_TABLE, TUNE_ALTERNATIVES

    def measure(kernel, constexprs, family, tile):
        rows = []
        for on in (False, True):
            c = {**constexprs, "CAUSAL": not on, "SOFTCAP": on, "WINDOW": on, "HAS_SINKS": on}
            compiled, log = compile_kernel(kernel, c, family, tile.num_warps, tile.num_stages, log=family == "sm90")
            regs = re.findall(r"Used (\d+) registers", log)
            spills = re.findall(r"(\d+) bytes spill stores", log)
            registers = f", {regs[-1]} regs, {spills[-1]} B spilled" if regs else ""
            rows.append(f"{compiled.metadata.shared} B{registers}")
            fits = compiled.metadata.shared <= SMEM[family]
        return f"plain {rows[0]} | features {rows[1]} {'fits' if fits else 'OVER BUDGET'}"

    def tile(t):
        return f"({t.block_m}, {t.block_n}, {t.num_warps}, {t.num_stages})"

    for family in ("sm90", "sm80", "sm86"):
        for d in (64, 128, 256):
            for t in [TILE_TABLE[family][d], *(c for c in TUNE_ALTERNATIVES[family][d] if not c.tma)]:
                c = dict(BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=d, HAS_KPM=False, HAS_SEQUSED=False,
                         HAS_SEG=False, EVEN_D=True, DOT_PRECISION="tf32", DROPOUT=False, STORE_LSE=True)
                print(f"{family} d{d} forward {tile(t)}: {measure(forward._flash_fwd_kernel, c, family, t)}")
            b = BACKWARD_TABLE[family][d]
            for name, kernel, t in (("dkdv", backward._flash_bwd_dkdv_kernel, b.dkdv),
                                    ("dq", backward._flash_bwd_dq_kernel, b.dq)):
                c = dict(BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=d, HAS_KPM=False, HAS_SEG=False,
                         DOT_PRECISION="tf32", DROPOUT=False, BOUNDARY=False)
                print(f"{family} d{d} {name} {tile(t)}: {measure(kernel, c, family, t)}")
            t = DECODE_TABLE[family][d]
            c = dict(BLOCK_R=16, BLOCK_N=t.block_n, BLOCK_D=d, HAS_KPM=False, HAS_SEQUSED=False, EVEN_D=True,
                     SPLIT=True, STORE_LSE=False, DOT_PRECISION="tf32", MERGE_UNROLL=4)
            print(f"{family} d{d} decode {tile(t)}: {measure(decode._flash_decode_kernel, c, family, t)}")


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "ptx"
    if mode == "ptx":
        sys.exit(0 if compare_ptx(sys.argv[2] if len(sys.argv) > 2 else "HEAD") else 1)
    resources()
