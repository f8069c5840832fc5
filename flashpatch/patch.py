"""apply / unapply / patched: route a loaded transformers model's attention through flashpatch."""

from __future__ import annotations

import contextlib
import sys
import warnings
import weakref
from dataclasses import dataclass, field

from .adapter import IMPL_NAME, STATES, PatchState, register
from .dispatch import path_for_device
from .registry import find_arch, unwrap, uses_attention_interface


class UnsupportedModelError(RuntimeError):
    """apply(fallback="error") on a model flashpatch cannot serve."""


@dataclass
class PatchReport:
    model_class: str
    architecture: str | None  # config.model_type
    entry: str | None  # registry entry used ('llama', 'gpt2', ..., 'generic'), None if not patched
    patched: bool
    original_impl: str | None
    layers_patched: int
    head_dim: int | None
    kernel_path: dict
    reasons: list[str] = field(default_factory=list)  # why the model was left as it is
    quirks: list[str] = field(default_factory=list)
    fallbacks: dict = field(default_factory=dict)  # per-call fallbacks seen so far: reason -> count
    # layers per attention feature the kernels apply beyond causal softmax: "sliding_window", "softcap", "sinks"
    features: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = dict(self.__dict__)
        data["fallbacks"] = dict(self.fallbacks)
        return data

    def __rich__(self):
        from rich.table import Table

        table = Table(title="flashpatch", show_header=False)
        table.add_row("model", f"{self.model_class} ({self.architecture})")
        table.add_row("patched", "yes" if self.patched else "[red]no[/red]")
        table.add_row("registry entry", str(self.entry))
        table.add_row("attention before", str(self.original_impl))
        table.add_row("layers patched", str(self.layers_patched))
        table.add_row("head dim", str(self.head_dim))
        for feature, layers in self.features.items():
            table.add_row("layers with", f"{feature}: {layers}")
        table.add_row("kernel path", f"{self.kernel_path['name']}: {self.kernel_path['reason']}")
        for reason in self.reasons:
            table.add_row("not served", reason)
        for quirk in self.quirks:
            table.add_row("quirk", quirk)
        for reason, count in self.fallbacks.items():
            table.add_row("fallback", f"{reason} ({count} calls)")
        return table

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=110)
        with console.capture() as capture:
            console.print(self)
        return capture.get()


def _configs(model) -> list:
    """Every config an attention module of this model may hold (sub-models have their own)."""
    from transformers import PreTrainedModel

    configs = {id(model.config): model.config}
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            configs.setdefault(id(module.config), module.config)
    return list(configs.values())


def _attention_layers(model) -> int:
    return sum(1 for m in model.modules() if type(m).__name__.endswith("Attention")
               and hasattr(sys.modules[type(m).__module__], "ALL_ATTENTION_FUNCTIONS"))


def _head_dim(config) -> int | None:
    from .archs.base import head_dim_of

    try:
        return head_dim_of(config)
    except (AttributeError, TypeError, ZeroDivisionError):
        return None


def _set_attn_implementation(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    for config in _configs(model):  # older transformers, and sub-models the call skipped
        config._attn_implementation = name


def _device(model):
    import torch

    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def apply(model, *, fallback: str = "warn") -> PatchReport:
    """Route `model`'s attention through flashpatch's kernels, in place. Idempotent.

    fallback="warn": a model or call the kernels can't serve keeps/uses its original attention,
    with a warning naming why. fallback="error": raise instead.
    """
    if fallback not in ("warn", "error"):
        raise ValueError(f"fallback must be 'warn' or 'error', got {fallback!r}")
    inner = unwrap(model)
    config = getattr(inner, "config", None)
    if config is None:
        raise UnsupportedModelError(f"{type(model).__name__} is not a transformers model (no .config)")
    state = STATES.get(id(config))
    if state is not None and config._attn_implementation == IMPL_NAME:
        state.fallback = fallback
        return _report(inner, state.arch, state.original_impl, patched=True, reasons=[], state=state)

    arch = find_arch(config)
    legacy = not uses_attention_interface(inner) and arch.legacy_install is not None
    reasons = [] if uses_attention_interface(inner) or legacy else [
        f"{type(inner).__name__} does not route attention through transformers' AttentionInterface"]
    if getattr(config, "is_causal", True) is False:
        reasons.append("config.is_causal=False: bidirectional attention in a decoder")
    reasons += arch.unsupported(config)
    reasons += _features_unserved(inner, _features(arch, config))
    original = config._attn_implementation
    if reasons:
        report = _report(inner, arch, original, patched=False, reasons=reasons, state=None)
        if fallback == "error":
            raise UnsupportedModelError(f"flashpatch cannot serve {type(inner).__name__}: " + "; ".join(reasons))
        warnings.warn(f"flashpatch left {type(inner).__name__} as it is: " + "; ".join(reasons), stacklevel=2)
        return report

    register()
    state = PatchState(original_impl=original, arch=arch, fallback=fallback,
                       sdpa_ok=bool(getattr(inner, "_supports_sdpa", True)))
    for cfg in _configs(inner):
        STATES[id(cfg)] = state
        state.finalizers.append(weakref.finalize(cfg, STATES.pop, id(cfg), None))  # ids of dead configs get reused
    if legacy:
        # The model still builds its mask through AttentionMaskInterface under config._attn_implementation.
        state.undo = arch.legacy_install(inner)
        for cfg in _configs(inner):
            cfg._attn_implementation = IMPL_NAME
    else:
        _set_attn_implementation(inner, IMPL_NAME)
    report = _report(inner, arch, original, patched=True, reasons=[], state=state)
    if not report.kernel_path["name"].startswith("triton"):
        if fallback == "error":
            unapply(inner)
            raise UnsupportedModelError(f"flashpatch kernels cannot run on {_device(inner)}: "
                                        f"{report.kernel_path['reason']}")
        warnings.warn(f"flashpatch: {report.kernel_path['reason']}; attention calls on this device fall back to "
                      f"{original!r}", stacklevel=2)
    return report


FEATURE_NAMES = {"sliding_window": "sliding-window attention", "softcap": "logit softcapping",
                 "sinks": "attention sinks"}


def _features(arch, config) -> dict:
    try:
        return dict(arch.features(config))
    except (AttributeError, TypeError):
        return {}


def _features_unserved(model, features: dict) -> list[str]:
    """Why features the config declares can't be served: the kernels take them from the attention call's kwargs
    (`sliding_window`, `softcap`, `s_aux`), which transformers guarantees only for classes that take its
    flash-attention path (that path has a 2D mask as well, and nothing else to learn them from)."""
    if not features or getattr(model, "_supports_flash_attn", False):
        return []
    return [f"{FEATURE_NAMES.get(name, name)} ({layers} layers) in {type(model).__name__}, which does not pass it to "
            "the attention function (no flash-attention support in transformers)" for name, layers in features.items()]


def _report(model, arch, original, *, patched, reasons, state) -> PatchReport:
    return PatchReport(
        model_class=type(model).__name__,
        architecture=getattr(model.config, "model_type", None),
        entry=arch.name if patched else None,
        patched=patched,
        original_impl=original,
        layers_patched=(len(state.undo) or _attention_layers(model)) if patched and state else 0,
        head_dim=_head_dim(model.config),
        kernel_path=path_for_device(_device(model)).to_dict(),
        reasons=list(reasons),
        quirks=list(arch.quirks),
        fallbacks=state.fallbacks if state is not None else {},
        features=_features(arch, model.config),
    )


def unapply(model) -> bool:
    """Restore the attention implementation that was there before apply. False if not patched."""
    inner = unwrap(model)
    state = STATES.get(id(inner.config))
    if state is None:
        return False
    if state.undo:
        for undo in state.undo:
            undo()
        for cfg in _configs(inner):
            cfg._attn_implementation = state.original_impl
    else:
        _set_attn_implementation(inner, state.original_impl)
    for cfg in _configs(inner):
        STATES.pop(id(cfg), None)
    for finalizer in state.finalizers:
        finalizer.detach()
    return True


@contextlib.contextmanager
def patched(model, *, fallback: str = "warn"):
    """`with flashpatch.patched(model) as report:` patched inside, restored on exit (exceptions too)."""
    was_patched = id(unwrap(model).config) in STATES
    report = apply(model, fallback=fallback)
    try:
        yield report
    finally:
        if not was_patched:
            unapply(model)
