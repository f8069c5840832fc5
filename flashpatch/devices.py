"""Models spread over several GPUs (accelerate's device_map="auto"): placing them, and timing and memory
counted over every GPU rather than the current one."""

from __future__ import annotations

import torch


def dispatch_auto(model):
    """Spread a model built on the CPU over the visible GPUs, whole decoder layers per GPU, balanced
    (what `from_pretrained(..., device_map="auto")` does for checkpoints). Without a GPU it stays on the CPU."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    memory = get_balanced_memory(model, no_split_module_classes=no_split)
    device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)
    return dispatch_model(model, device_map=device_map)


def model_devices(model) -> list[str]:
    return sorted({str(p.device) for p in model.parameters()})


def _cuda_indices() -> range:
    return range(torch.cuda.device_count()) if torch.cuda.is_available() else range(0)


def synchronize_all() -> None:
    for index in _cuda_indices():
        torch.cuda.synchronize(index)


def memory_allocated_all() -> int:
    return sum(torch.cuda.memory_allocated(index) for index in _cuda_indices())


def max_memory_allocated_all() -> int:
    """Sum of each GPU's peak: for a model split by layers the GPUs peak in turn, so this bounds the total."""
    return sum(torch.cuda.max_memory_allocated(index) for index in _cuda_indices())


def reset_peak_memory_all() -> None:
    for index in _cuda_indices():
        torch.cuda.reset_peak_memory_stats(index)
