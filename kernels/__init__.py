"""Triton kernels and their launch code. Math only: nothing here imports transformers."""

from .backward import flash_attn_backward
from .config import (DECODE_TABLE, INTERPRETER_SM_COUNT, TILE_TABLE, TileConfig, decode_splits, gpu_family,
                     select_backward_config, select_config, select_decode_config, uses_decode_kernel)
from .decode import flash_decode_forward
from .forward import flash_attn_forward

__all__ = ["DECODE_TABLE", "INTERPRETER_SM_COUNT", "TILE_TABLE", "TileConfig", "decode_splits", "flash_attn_backward",
           "flash_attn_forward", "flash_decode_forward", "gpu_family", "select_backward_config", "select_config",
           "select_decode_config", "uses_decode_kernel"]
