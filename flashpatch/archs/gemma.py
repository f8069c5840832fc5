"""Gemma 2 and Gemma 3 (text): alternating local (sliding-window) and global layers, the softmax scale
query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5; Gemma 2 also caps the scores,
attn_logit_softcapping * tanh(scores / attn_logit_softcapping), after the scale.

SDPA cannot softcap: transformers 5.24 refuses sdpa for Gemma 2, 5.17 loads it with sdpa and drops the cap. Calls
flashpatch cannot serve fall back to eager.
"""

from .base import ArchSpec, layer_features

GEMMA2 = ArchSpec(
    name="gemma2",
    model_types=("gemma2",),
    head_dims=(128, 256),
    scaling=lambda module: module.config.query_pre_attn_scalar ** -0.5,
    quirks=(
        "softmax scale query_pre_attn_scalar ** -0.5 (the scaling kwarg)",
        "logit softcapping on every layer: softcap * tanh(scale * q.k / softcap), forward and backward",
        "layer_types alternate sliding_attention (window (sliding_window - 1, 0)) and full_attention",
        "no sdpa in transformers: fallbacks run eager",
    ),
)

GEMMA3 = ArchSpec(
    name="gemma3",
    model_types=("gemma3_text",),
    head_dims=(128, 256),
    scaling=lambda module: module.config.query_pre_attn_scalar ** -0.5,
    # Gemma 3's attention never passes attn_logit_softcapping on (its eager path does not cap either).
    features=lambda config: layer_features(config, softcap=False),
    quirks=(
        "softmax scale query_pre_attn_scalar ** -0.5 (the scaling kwarg); q/k RMS norms before attention",
        "layer_types: five sliding_attention layers (window (sliding_window - 1, 0)) per full_attention layer",
    ),
)
