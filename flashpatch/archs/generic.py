"""Any other model whose attention goes through transformers' AttentionInterface.

Served only when its layers use nothing the kernels lack; otherwise the report names what.
"""

from .base import ArchSpec, head_dim_of, head_dim_problem

# model_type -> feature the kernels do not serve, for families whose config does not say it plainly.
KNOWN_UNSUPPORTED = {
    "gpt_oss": "attention sinks",
    "bloom": "ALiBi position bias",
    "mpt": "ALiBi position bias",
    "falcon": "ALiBi position bias (when config.alibi) / parallel attention variants",
    "t5": "relative position bias",
}


def _unsupported(config) -> list[str]:
    reasons = []
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        reasons.append(f"sliding-window attention (sliding_window={config.sliding_window})")
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        reasons.append("sliding-window attention layers (layer_types)")
    for key in ("attn_logit_softcapping", "attention_logit_softcapping"):
        if getattr(config, key, None):
            reasons.append(f"logit softcapping ({key}={getattr(config, key)})")
    if getattr(config, "alibi", False):
        reasons.append("ALiBi position bias")
    if config.model_type in KNOWN_UNSUPPORTED and config.model_type != "falcon":
        reasons.append(KNOWN_UNSUPPORTED[config.model_type])
    if getattr(config, "is_encoder_decoder", False):
        reasons.append("encoder-decoder model (bidirectional encoder attention)")
    try:
        reasons += head_dim_problem(head_dim_of(config))
    except (AttributeError, TypeError, ZeroDivisionError):
        reasons.append("head_dim cannot be read from the config")
    return reasons


SPEC = ArchSpec(
    name="generic",
    model_types=(),
    head_dims=(),
    unsupported=_unsupported,
    quirks=("served through the AttentionInterface with the scale the model passes",),
)
