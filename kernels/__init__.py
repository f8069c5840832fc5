"""Triton kernels and their launch code. Math only: nothing here imports transformers."""

from .backward import flash_attn_backward
from .config import (INTERPRETER_SM_COUNT, TILE_TABLE, TileConfig, decode_splits, gpu_family,
                     select_backward_config, select_config)
from .forward import flash_attn_forward

__all__ = ["INTERPRETER_SM_COUNT", "TILE_TABLE", "TileConfig", "decode_splits", "flash_attn_backward",
           "flash_attn_forward", "gpu_family", "select_backward_config", "select_config"]
