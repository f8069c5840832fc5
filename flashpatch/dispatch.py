"""Which kernel path serves a device, or the named fallback and why. Pure where it can be."""

from __future__ import annotations

import contextlib
import functools
import re
from dataclasses import asdict, dataclass

import torch

@dataclass(frozen=True)
class KernelPath:
    """`name` is what serves attention: 'triton-sm90', 'triton-interpreter', or 'fallback'."""

    name: str
    family: str | None  # tile-table family ('sm90', 'sm80', 'sm86'); None for the interpreter
    reason: str

    @property
    def usable(self) -> bool:
        return self.name != "fallback"

    def to_dict(self) -> dict:
        return asdict(self)


# The oldest Triton these kernels have run on (the GPU image's); an older one gets the named fallback rather
# than launches nobody has tried (launcher API, do_not_specialize, dot precisions).
MIN_TRITON = (3, 6)


def triton_too_old(version: str) -> str | None:
    found = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if found < MIN_TRITON:
        return (f"Triton {version} is older than {MIN_TRITON[0]}.{MIN_TRITON[1]}, the oldest release the kernels are "
                "tested on (pip install -U triton)")
    return None


@functools.lru_cache(maxsize=1)
def triton_import_error() -> str | None:
    try:
        import triton

        too_old = triton_too_old(triton.__version__)
        if too_old is not None:
            return too_old
        from flashpatch import kernels  # noqa: F401
    except Exception as exc:  # ImportError, or a broken Triton install
        return f"{type(exc).__name__}: {exc}"
    return None


def interpreter_active() -> bool:
    """True when our kernels were built by Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    if triton_import_error() is not None:
        return False
    return kernels().interpreted()


def path_for_capability(capability: tuple[int, int] | None, *, triton_error: str | None = None,
                        interpreter: bool = False) -> KernelPath:
    """Pure decision: capability None means a CPU device."""
    from flashpatch.kernels.config import gpu_family

    if triton_error is not None:
        return KernelPath("fallback", None, f"Triton unavailable ({triton_error})")
    if capability is None:
        if interpreter:
            return KernelPath("triton-interpreter", None, "CPU tensors under TRITON_INTERPRET=1 (slow; for proofs)")
        return KernelPath("fallback", None, "no CUDA device (set TRITON_INTERPRET=1 before import to run the kernels on CPU)")
    if interpreter:
        return KernelPath("fallback", None, "TRITON_INTERPRET=1 is set: kernels run on CPU tensors only")
    family = gpu_family(capability)
    if family is None:
        major, minor = capability
        return KernelPath("fallback", None, f"GPU sm{major}{minor} is older than sm80 (Ampere): no tile table for it")
    major, minor = capability
    return KernelPath(f"triton-{family}", family, f"sm{major}{minor} uses the {family} tile table")


@functools.lru_cache(maxsize=32)  # on the hot path: every attention call asks
def path_for_device(device: torch.device) -> KernelPath:
    capability = None
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
    elif device.type != "cpu":
        return KernelPath("fallback", None, f"device type {device.type!r} is not served (CUDA or the CPU interpreter only)")
    return path_for_capability(capability, triton_error=triton_import_error(), interpreter=interpreter_active())


def unusable_reason(device: torch.device) -> str | None:
    """Why the kernels cannot serve `device`, or None when they can."""
    path = path_for_device(device)
    return None if path.usable else path.reason


# Traced models ask at compile time, not in the graph: torch.compiler.assume_constant_result(fn) does exactly
# this (tests/test_dispatch.py checks it still does), but calling it imports torch._dynamo and with it Triton,
# and Triton's language must not be imported before the CLI sets TRITON_INTERPRET for a CPU run.
unusable_reason._dynamo_marked_constant = True


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


_KERNELS = None


def kernels():
    """flashpatch.kernels, imported on first use: TRITON_INTERPRET must be set before Triton's language is imported,
    which importing the kernels does. Held once imported: every call asks, and an import statement costs 0.15 us."""
    global _KERNELS
    if _KERNELS is None:
        import flashpatch.kernels

        _KERNELS = flashpatch.kernels
    return _KERNELS


# CUDA device index -> (kernel path, SM count, index): every call asks, and building q.device costs more than this.
_CUDA_DEVICES: dict = {}


def device_info(q: torch.Tensor) -> tuple[KernelPath, int, int]:
    """(kernel path, SM count, CUDA index or -1) for the device of `q`."""
    if not q.is_cuda:
        return path_for_device(q.device), kernels().INTERPRETER_SM_COUNT, -1
    index = q.get_device()
    info = _CUDA_DEVICES.get(index)
    if info is None:
        props = torch.cuda.get_device_properties(index)
        info = _CUDA_DEVICES[index] = (path_for_device(q.device), props.multi_processor_count, index)
    return info


def device_guard(index: int):
    """Kernels launch on the current device: make it q's for the call when it isn't already."""
    if index >= 0 and index != torch.cuda.current_device():
        return torch.cuda.device(index)
    return contextlib.nullcontext()


def reset() -> None:
    """Forget the devices seen (tests)."""
    _CUDA_DEVICES.clear()
