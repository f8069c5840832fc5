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


def head_dim_of(config) -> int:
    explicit = getattr(config, "head_dim", None)
    if explicit:
        return int(explicit)
    return config.hidden_size // config.num_attention_heads


def head_dim_problem(head_dim: int) -> list[str]:
    """`unsupported`'s reasons for a head dim: the op's own rule."""
    reason = ops.head_dim_problem(head_dim)
    return [reason] if reason else []
