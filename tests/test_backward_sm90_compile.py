"""The Gluon sm90 backward (kernels/backward_sm90.py) compiled for an H100/H200 target without a GPU (Triton's bundled
ptxas): every config, causal and not, within shared memory, with wgmma and TMA in its PTX. One subprocess compiles
them all, outside the interpreter conftest turns on without CUDA. On a Triton whose Gluon API differs from the one
the kernel is written for (3.6's), the cases skip."""

import pytest

from flashpatch.kernels.backward_sm90 import SHARED_MEMORY_LIMIT, SM90_BWD_CONFIGS
from helpers import compile_in_subprocess, compiled_row

CASES = [(d, i, causal, "") for d in sorted(SM90_BWD_CONFIGS) for i in range(len(SM90_BWD_CONFIGS[d]))
         for causal in (False, True)]
# With a key padding mask, segment ids or both: each head dim's first two candidates (the first is the default).
MASK_CASES = [(d, i, causal, masks) for d in (64, 128) for i in (0, 1) for causal in (False, True)
              for masks in ("kpm", "seg", "kpm+seg")]

COMPILE_SCRIPT = """
import json, sys
try:
    from flashpatch.kernels.backward_sm90 import HAS_GLUON, SM90_BWD_CONFIGS, compile_sm90
except Exception as e:
    print(json.dumps({"import_error": f"{type(e).__name__}: {e}"}))
    raise SystemExit(0)
if not HAS_GLUON:
    print(json.dumps({"import_error": "this Triton has no Gluon (or not 3.6's API)"}))
    raise SystemExit(0)
for d, i, causal, masks in json.loads(sys.argv[1]):
    try:
        c = compile_sm90(SM90_BWD_CONFIGS[d][i], d, causal=causal, key_padding_mask="kpm" in masks,
                         segment_ids="seg" in masks)
        ptx = c.asm["ptx"]
        row = {"shared": c.metadata.shared, "wgmma": ptx.count("wgmma.mma_async"),
               "tma": ptx.count("cp.async.bulk.tensor")}
    except Exception as e:
        row = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}",
               "error_type": type(e).__name__}
    print(json.dumps({f"{d}-{i}-{causal}-{masks}": row}), flush=True)
"""


@pytest.fixture(scope="module")
def compiled():
    return compile_in_subprocess(COMPILE_SCRIPT, CASES + MASK_CASES)


@pytest.mark.parametrize("head_dim,index,causal,masks", CASES + MASK_CASES,
                         ids=[f"d{d}-{SM90_BWD_CONFIGS[d][i].label()}-{'causal' if c else 'full'}{'-' + m if m else ''}"
                              for d, i, c, m in CASES + MASK_CASES])
def test_compiles_for_sm90(head_dim, index, causal, masks, compiled):
    row = compiled_row(compiled, f"{head_dim}-{index}-{causal}-{masks}")
    assert 0 < row["shared"] <= SHARED_MEMORY_LIMIT
    assert row["wgmma"] > 0 and row["tma"] > 0
