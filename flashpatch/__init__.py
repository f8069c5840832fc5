"""flashpatch: Triton flash attention for Hugging Face transformers models."""

from .ops import AttentionInputError, attention

__all__ = ["AttentionInputError", "attention"]
__version__ = "0.1.0"
