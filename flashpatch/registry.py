"""Which registry entry serves a model: one module per architecture, then the generic entry."""

from __future__ import annotations

from .archs import gemma, generic, gpt2, gpt_neox, gpt_oss, gptj, llama, mistral, phi3, qwen2
from .archs.base import ArchSpec

ARCHS: tuple[ArchSpec, ...] = (llama.SPEC, gpt2.SPEC, gptj.SPEC, gpt_neox.SPEC, mistral.SPEC, qwen2.SPEC, phi3.SPEC,
                               gemma.GEMMA2, gemma.GEMMA3, gpt_oss.SPEC)
GENERIC = generic.SPEC


def unwrap(model):
    """The transformers model inside torch.compile's OptimizedModule and PEFT wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):  # PEFT
            model = model.get_base_model()
    return model


def uses_attention_interface(model) -> bool:
    """True when the model class routes attention through AttentionInterface (transformers' own flag)."""
    return bool(getattr(model, "_supports_attention_backend", False))


def find_arch(config) -> ArchSpec:
    model_type = getattr(config, "model_type", None)
    for spec in ARCHS:
        if model_type in spec.model_types:
            return spec
    return GENERIC
