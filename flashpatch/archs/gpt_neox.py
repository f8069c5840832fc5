"""GPT-NeoX / Pythia: fused QKV, partial rotary (rotary_pct) applied before attention, head dims 64-128."""

from .base import ArchSpec


SPEC = ArchSpec(
    name="gpt_neox",
    model_types=("gpt_neox",),
    head_dims=(64, 80, 96, 128),
    scaling=lambda module: module.head_size ** -0.5,
    quirks=(
        "rotary_pct (partial_rotary_factor) rotates a prefix of each head inside GPTNeoXAttention, before the attention call",
        "head dims 80 (Pythia-2.8B) and 96 (NeoX-20B) are padded to 128 inside the kernel",
    ),
)
