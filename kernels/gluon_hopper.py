"""What the Gluon sm90 kernels (forward_sm90.py, backward_sm90.py) share: Gluon's Hopper layer as Triton 3.6 names it,
stand-ins where Triton has no Gluon, and the host-side tensor descriptors over [B, H, S, D] views."""

import functools
import inspect

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    # The kernels are written against Triton 3.6's Gluon, whose warp_specialize takes (function, args) pairs;
    # earlier releases had another signature.
    HAS_GLUON = "functions_and_args" in inspect.signature(gl.warp_specialize).parameters
except ImportError:  # a Triton without Gluon: the kernels are never eligible and nothing compiles

    class _NoGluon:
        constexpr = None

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    gluon = gl = _NoGluon()
    fence_async_shared = mbarrier = tma = warpgroup_mma = warpgroup_mma_wait = TensorDescriptor = None
    HAS_GLUON = False

if HAS_GLUON:
    # Triton 3.6 names the TMA copies async_copy_global_to_shared / async_copy_shared_to_global; later releases
    # call them async_load / async_store (and make the old names raise).
    tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
else:
    tma_load = tma_store = None

SHARED_MEMORY_LIMIT = 232448  # bytes of shared memory one H100/H200 block may use (227 KB)


_SM_COUNT: dict = {}


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (persistent grids launch one program each), looked up once."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def gl_dtype(dtype: torch.dtype):
    return {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16, torch.float32: gl.float32}[dtype]


@functools.lru_cache(maxsize=64)
def _shared_layout(rows: int, width: int, dtype: torch.dtype):
    """The swizzled shared-memory layout of a [1, 1, rows, width] block, worked out once (about 5 us a call)."""
    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, width], gl_dtype(dtype))


def descriptor(t: torch.Tensor, rows: int, width: int | None = None):
    """Over the [B, H, S, D] view as it is strided: no copy for a [B, S, H, D] projection either. `width`: the
    block's head-dim extent (the kernel's), at least the tensor's; TMA zero-fills past the tensor's."""
    width = width or t.shape[-1]
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, width],
                            _shared_layout(rows, width, t.dtype))
