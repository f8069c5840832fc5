"""What the sm90 probes (sm90_forward_probe.py, sm90_backward_probe.py) share: a timestamped log, results saved as
JSON as they come, a guard that ends the process when a kernel hangs, NaN-poisoned outputs, and inputs in either
memory layout."""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager

import torch

STATE = {"started": time.time(), "results": {}, "out": None}  # out: the JSON file results go to


def log(msg: str) -> None:
    print(f"[{time.time() - STATE['started']:6.1f}s] {msg}", flush=True)


def save() -> None:
    if STATE["out"]:
        os.makedirs(os.path.dirname(os.path.abspath(STATE["out"])), exist_ok=True)
        with open(STATE["out"], "w") as f:
            json.dump(STATE["results"], f, indent=1, default=str)


@contextmanager
def watchdog(seconds: float, what: str):
    """Exit the process (after saving) if the block does not finish: a hung kernel never returns."""
    def fire():
        log(f"HANG: {what} did not finish in {seconds:.0f} s; exiting (rerun with --skip for that config)")
        STATE["results"]["hang"] = what
        save()
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
        torch.cuda.synchronize()
    finally:
        timer.cancel()


@contextmanager
def poisoned_empty():
    """torch.empty returns NaN-filled tensors, so any element a kernel fails to write shows."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real


def make_qkv(batch, heads_q, heads_k, seq_q, seq_k, head_dim, dtype, layout, device="cuda"):
    def one(heads, seq):
        if layout == "bshd":  # what transformers hands over: [B, S, H, D] memory viewed as [B, H, S, D]
            return torch.randn(batch, seq, heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
        return torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype)

    return one(heads_q, seq_q), one(heads_k, seq_k), one(heads_k, seq_k)
