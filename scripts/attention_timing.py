"""For the host-time scripts: route a model's attention through sdpa or flashpatch, appending each attention
call's host seconds (launches included, no sync) to a list."""

import time

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import flashpatch
from flashpatch.adapter import IMPL_NAME, flashpatch_attention_forward


def _timed(fn, spent: list):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        spent.append(time.perf_counter() - start)
        return out
    return wrapper


def use(model, impl: str, spent: list) -> None:
    """Make `impl` ("sdpa" or "flashpatch") the model's attention, its calls timed into `spent`."""
    flashpatch.unapply(model)
    if impl == "flashpatch":
        flashpatch.apply(model, fallback="error")
        AttentionInterface.register(IMPL_NAME, _timed(flashpatch_attention_forward, spent))
    else:
        model.set_attn_implementation("sdpa")
        AttentionInterface.register("sdpa", _timed(sdpa_attention_forward, spent))


def restore() -> None:
    """transformers' own sdpa entry back under its name."""
    AttentionInterface.register("sdpa", sdpa_attention_forward)
