"""Triton kernels and their launch code. Math only: nothing here imports transformers."""

from .config import TILE_TABLE, TileConfig, gpu_family, select_config
from .forward import flash_attn_forward

__all__ = ["TILE_TABLE", "TileConfig", "flash_attn_forward", "gpu_family", "select_config"]
