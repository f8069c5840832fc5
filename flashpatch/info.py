"""What `flashpatch info` reports: versions, the GPU, and which kernel path would serve it."""

from __future__ import annotations

import importlib.metadata
from dataclasses import asdict

import torch

from .dispatch import default_device, path_for_capability, path_for_device, triton_import_error


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def gather_info() -> dict:
    device = default_device()
    info = {
        "versions": {name: _version(name) for name in ("flashpatch", "torch", "triton", "transformers")},
        "device": str(device),
        "gpu": None,
        "kernel_path": path_for_device(device).to_dict(),  # what apply() does in this process
        # what `flashpatch verify` / `bench` do: without a GPU they set TRITON_INTERPRET=1 before the kernels load
        "cli_kernel_path": (path_for_device(device) if device.type == "cuda" else path_for_capability(
            None, triton_error=triton_import_error(), interpreter=True)).to_dict(),
        "tiles": {},
        "tune_candidates": {},
        "backward_tiles": {},
        "decode_tiles": {},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "shared_memory_per_block_kib": getattr(props, "shared_memory_per_block_optin", 0) // 1024 or None,
        }
    family = info["kernel_path"]["family"]
    if family is not None:
        from flashpatch.kernels import BACKWARD_TABLE, DECODE_TABLE, TILE_TABLE, tune_candidates

        info["tiles"] = {f"head_dim<={d}": asdict(cfg) for d, cfg in TILE_TABLE[family].items()}
        info["tune_candidates"] = {f"head_dim<={d}": [asdict(c) for c in tune_candidates(family, d)[1:]]
                                   for d in TILE_TABLE[family]}
        info["backward_tiles"] = {f"head_dim<={d}": {"dkdv": asdict(cfg.dkdv), "dq": asdict(cfg.dq)}
                                  for d, cfg in BACKWARD_TABLE[family].items()}
        info["decode_tiles"] = {f"head_dim<={d}": asdict(cfg) for d, cfg in DECODE_TABLE[family].items()}
        from flashpatch.kernels import FP8_TABLE

        if family in FP8_TABLE:  # flashpatch.attention_fp8's row and alternative
            info["fp8_tiles"] = {f"head_dim={d}": [asdict(c) for c in cands] for d, cands in FP8_TABLE[family].items()}
        if family == "sm90":  # the Gluon forward's candidates, for plain 16-bit calls (kernels/forward_sm90.py)
            from flashpatch.kernels import forward_sm90
            from flashpatch.kernels.plans import GLUON_SWITCH

            info["sm90_gluon"] = {"available": forward_sm90.HAS_GLUON, "switch": f"{GLUON_SWITCH}=0 leaves it out of the candidates",
                                  "candidates": {f"head_dim={d}": [c.label() for c in cands]
                                                 for d, cands in forward_sm90.SM90_CONFIGS.items()}}
            from flashpatch.kernels import backward_sm90
            from flashpatch.kernels.plans import SM90_BACKWARD_SWITCH

            # the Gluon backward (kernels/backward_sm90.py): 16-bit training calls, padded and packed too
            info["sm90_gluon_backward"] = {
                "available": backward_sm90.HAS_GLUON, "switch": f"{SM90_BACKWARD_SWITCH}=0 keeps the portable backward",
                "config": {f"head_dim={d}": backward_sm90.default_config(d).label()
                           for d in backward_sm90.SM90_BWD_HEAD_DIMS}}
        from flashpatch.kernels.autotune import cache_file, enabled

        info["autotune"] = {"enabled": enabled(), "cache": cache_file(family),
                            "switch": "FLASHPATCH_AUTOTUNE=0 uses the first candidate only"}
    return info
