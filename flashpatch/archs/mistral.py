"""Mistral: Llama's attention with a sliding window on every layer when config.sliding_window is set (Mistral 7B
v0.1: 4096; later releases leave it None)."""

from .base import ArchSpec

SPEC = ArchSpec(
    name="mistral",
    model_types=("mistral",),
    head_dims=(128,),
    scaling=lambda module: module.head_dim ** -0.5,
    quirks=(
        "sliding_window W on every layer: window (W - 1, 0), calls with at most W keys (decode over the "
        "sliding-window cache) run plain causal",
        "GQA: num_key_value_heads < num_attention_heads is served without repeat_kv",
    ),
)
