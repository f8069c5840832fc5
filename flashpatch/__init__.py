"""flashpatch: Triton flash attention for Hugging Face transformers models."""

from .fp8 import attention_fp8
from .ops import AttentionInputError, attention, kernels_used


def __getattr__(name):
    # apply/unapply/patched import transformers: only load them when asked for.
    if name in ("apply", "unapply", "patched", "PatchReport", "UnsupportedModelError"):
        from . import patch

        return getattr(patch, name)
    if name == "FallbackError":
        from .adapter import FallbackError

        return FallbackError
    raise AttributeError(f"module 'flashpatch' has no attribute {name!r}")


__all__ = ["AttentionInputError", "FallbackError", "PatchReport", "UnsupportedModelError", "apply", "attention",
           "attention_fp8", "kernels_used", "patched", "unapply"]
__version__ = "0.1.0"
