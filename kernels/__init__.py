"""Triton kernels, their launch plans and tile tables. Math only: nothing here imports transformers."""

import os

if os.environ.get("TRITON_INTERPRET") == "1":
    from . import interpreter_compat

    interpreter_compat.install()

from . import plans
from .autotune import AUTOTUNER, tune_key
from .backward import flash_attn_backward
from .config import (BACKWARD_TABLE, DECODE_TABLE, FP8_TABLE, INTERPRETER_SM_COUNT, SHORT_Q_BLOCK_M, TILE_TABLE,
                     BackwardConfig, TileConfig, decode_split_config, decode_splits, fp8_candidates, gpu_family,
                     head_dim_bucket, select_backward_config, select_config, select_decode_config, tune_candidates,
                     uses_decode_kernel)
from .decode import DecodePlan, flash_decode_forward
from .forward import ForwardPlan, flash_attn_forward
from .forward_fp8 import flash_attn_forward_fp8, quantize_per_tensor


def interpreted() -> bool:
    """True when these kernels were built by Triton's CPU interpreter (TRITON_INTERPRET=1 when they were imported)."""
    from .forward import _flash_fwd_kernel
    from .launch import _is_interpreted

    return _is_interpreted(_flash_fwd_kernel)

__all__ = ["AUTOTUNER", "BACKWARD_TABLE", "BackwardConfig", "DECODE_TABLE", "DecodePlan", "FP8_TABLE", "ForwardPlan",
           "INTERPRETER_SM_COUNT", "SHORT_Q_BLOCK_M", "TILE_TABLE", "TileConfig", "decode_split_config",
           "decode_splits",
           "flash_attn_backward", "flash_attn_forward", "flash_attn_forward_fp8", "flash_decode_forward",
           "fp8_candidates", "gpu_family", "head_dim_bucket", "interpreted", "plans", "quantize_per_tensor", "select_backward_config",
           "select_config", "select_decode_config", "tune_candidates", "tune_key", "uses_decode_kernel"]
