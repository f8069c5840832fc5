"""gpt-oss: a learned sink logit per query head (`s_aux`, the module's `sinks`) joins every row's softmax with no
value vector; layer_types alternate sliding_attention (window 128) and full_attention; GQA with MoE MLPs.

transformers refuses sdpa for gpt-oss (it has no sinks): calls flashpatch cannot serve fall back to eager.
"""

from .base import ArchSpec, layer_features

SPEC = ArchSpec(
    name="gpt_oss",
    model_types=("gpt_oss",),
    head_dims=(64,),
    scaling=lambda module: module.head_dim ** -0.5,
    features=lambda config: layer_features(config, softcap=False, sinks=True),
    quirks=(
        "sinks (s_aux) on every layer, forward, backward (d sinks) and decode",
        "layer_types alternate sliding_attention (window (sliding_window - 1, 0)) and full_attention",
        "no sdpa in transformers: fallbacks run eager",
    ),
)
