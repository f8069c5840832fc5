"""Any other model whose attention goes through transformers' AttentionInterface.

Served only when its layers use nothing the kernels lack; otherwise the report names what. Sliding windows,
softcapping and sinks are served where the model passes them to the attention function as transformers'
flash-attention path takes them (`sliding_window`, `softcap`, `s_aux` kwargs; patch.apply checks the class).
"""

from .base import ArchSpec, head_dim_of, head_dim_problem

# model_type -> feature the kernels do not serve, for families whose config does not say it plainly.
KNOWN_UNSUPPORTED = {
    "bloom": "ALiBi position bias",
    "mpt": "ALiBi position bias",
    "falcon": "ALiBi position bias (when config.alibi) / parallel attention variants",
    "t5": "relative position bias",
}


def _unsupported(config) -> list[str]:
    reasons = []
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
