"""Phi-3 (mini, medium): fused qkv projection, partial rotary; config.sliding_window (Phi-3 mini 4K: 2047) bounds
every layer's attention."""

from .base import ArchSpec

SPEC = ArchSpec(
    name="phi3",
    model_types=("phi3",),
    head_dims=(96, 128),
    scaling=lambda module: module.head_dim ** -0.5,
    quirks=(
        "sliding_window W on every layer: window (W - 1, 0)",
        "head dim 96 (Phi-3 mini) is padded to 128 inside the kernel",
    ),
)
