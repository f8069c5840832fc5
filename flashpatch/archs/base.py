"""What a registry entry knows about one architecture."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .. import ops


@dataclass(frozen=True)
class ArchSpec:
    name: str
    model_types: tuple[str, ...]
    # Head dims seen in this family's real checkpoints (documentation; any multiple of 8 <= 256 runs).
    head_dims: tuple[int, ...]
    # Why a given config cannot be served (empty list: it can). Checked once, at apply time.
    unsupported: Callable[[object], list[str]] = lambda config: head_dim_problem(head_dim_of(config))
    # Softmax scale for a module when the call passes no `scaling` kwarg (older transformers).
    scaling: Callable[[object], float | None] = lambda module: getattr(module, "scaling", None)
    quirks: tuple[str, ...] = field(default_factory=tuple)
    # For transformers versions where this architecture predates the AttentionInterface: installs the
    # patch on the model's attention modules and returns callables that undo it.
    legacy_install: Callable[[object], list] | None = None
    # How many layers use each attention feature beyond causal softmax ("sliding_window", "softcap", "sinks"): what
    # the model's attention passes the attention function (its `sliding_window`, `softcap`, `s_aux` kwargs).
    features: Callable[[object], dict[str, int]] = lambda config: layer_features(config)


def head_dim_of(config) -> int:
    explicit = getattr(config, "head_dim", None)
    if explicit:
        return int(explicit)
    return config.hidden_size // config.num_attention_heads


def head_dim_problem(head_dim: int) -> list[str]:
    """`unsupported`'s reasons for a head dim: the op's own rule."""
    reason = ops.head_dim_problem(head_dim)
    return [reason] if reason else []


def sliding_layers(config) -> int:
    """Layers of sliding-window attention: those layer_types marks "sliding_attention", or every layer where the
    config has a window and no layer_types (Mistral, Phi-3)."""
    if not getattr(config, "sliding_window", None) or not getattr(config, "use_sliding_window", True):
        return 0
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return sum(1 for t in layer_types[:config.num_hidden_layers] if t == "sliding_attention")
    return int(config.num_hidden_layers)


def layer_features(config, softcap: bool = True, sinks: bool = False) -> dict[str, int]:
    """Per-feature layer counts from the config (nonzero entries only): sliding windows, logit softcapping
    (attn_logit_softcapping, on every layer, where `softcap` says the attention passes it), sinks on every layer."""
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    counts = {"sliding_window": sliding_layers(config),
              "softcap": layers if softcap and getattr(config, "attn_logit_softcapping", None) else 0,
              "sinks": layers if sinks else 0}
    return {name: count for name, count in counts.items() if count}
