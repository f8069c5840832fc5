"""GPT-2: Conv1D projections, optional per-layer scale, eager-only upcast/reorder."""

from .base import ArchSpec


def _scaling(module) -> float:
    """GPT-2's scale, from its config (transformers passes `scaling=` itself; older versions did not)."""
    scale = module.head_dim ** -0.5 if module.scale_attn_weights else 1.0
    if module.scale_attn_by_inverse_layer_idx:
        scale /= float(module.layer_idx + 1)
    return scale


SPEC = ArchSpec(
    name="gpt2",
    model_types=("gpt2",),
    head_dims=(64,),
    scaling=_scaling,
    quirks=(
        "scale_attn_weights and scale_attn_by_inverse_layer_idx fold into the softmax scale",
        "reorder_and_upcast_attn only changes eager's precision; the kernels already compute scores and softmax in float32",
        "cross-attention (add_cross_attention) runs non-causal",
    ),
)
