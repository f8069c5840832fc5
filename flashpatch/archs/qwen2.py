"""Qwen2 / Qwen3: Llama-like attention (Qwen3 adds q/k RMS norms before it); with use_sliding_window, the layers
from max_window_layers on are sliding-window layers (layer_types)."""

from .base import ArchSpec

SPEC = ArchSpec(
    name="qwen2",
    model_types=("qwen2", "qwen3"),
    head_dims=(64, 128),
    scaling=lambda module: module.head_dim ** -0.5,
    quirks=(
        "layer_types: 'sliding_attention' layers get window (sliding_window - 1, 0), 'full_attention' layers none",
        "GQA: num_key_value_heads < num_attention_heads is served without repeat_kv",
    ),
)
