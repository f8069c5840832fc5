"""Llama (1, 2, 3; SmolLM2): rotary applied to q/k before attention, GQA, scale 1/sqrt(head_dim)."""

from .base import ArchSpec


SPEC = ArchSpec(
    name="llama",
    model_types=("llama",),
    head_dims=(64, 128),
    scaling=lambda module: module.head_dim ** -0.5,
    quirks=(
        "GQA: num_key_value_heads < num_attention_heads is served without repeat_kv",
        "rotary embeddings are applied to q and k inside LlamaAttention, before the attention call",
    ),
)
