"""Training-step benchmark: samples/sec and peak memory of forward + backward + optimizer step.

One model, several (batch, context) shapes, the baselines as
transformers ships them (`eager`, `sdpa`) and flashpatch side by side in one process. Random tokens,
AdamW, bf16 weights on a GPU. An out-of-memory shape is recorded as OOM and the run goes on.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from .switch import each_implementation


@dataclass
class TrainRow:
    impl: str
    batch: int
    context: int
    samples_per_s: float | None = None
    step_ms: float | None = None
    peak_mib: float | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _step(model, optimizer, ids):
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def _cell(model, impl, batch, context, steps, device) -> TrainRow:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
    try:
        _step(model, optimizer, ids)  # warm-up: kernels compile, optimizer state is allocated
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            loss = _step(model, optimizer, ids)
            sync()
            times.append(time.perf_counter() - start)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()}")
    except Exception as exc:  # OOM or any failure of one shape: record it, go on
        reason = "OOM" if isinstance(exc, torch.OutOfMemoryError) else f"{type(exc).__name__}: {exc}"
        return TrainRow(impl, batch, context, error=reason.splitlines()[0][:160])
    finally:
        del optimizer
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    step = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return TrainRow(impl, batch, context, batch / step, step * 1e3, peak)


def bench_training(model, shapes, *, baselines=("eager", "sdpa"), steps=3, progress=None) -> list[TrainRow]:
    """One row per (implementation, (batch, context)); the model's attention is restored at the end."""
    device = next(model.parameters()).device
    model.train()
    rows = []
    for impl, unavailable in each_implementation(model, baselines):
        for batch, context in shapes:
            rows.append(TrainRow(impl, batch, context, error=unavailable) if unavailable
                        else _cell(model, impl, batch, context, steps, device))
            if progress:
                progress()
    return rows


def markdown(rows: list[TrainRow], baselines=("eager", "sdpa")) -> str:
    impls = (*baselines, "flashpatch")
    keyed = {(r.impl, r.batch, r.context): r for r in rows}
    header = (["batch x context"] + [f"{i} samples/s" for i in impls] + [f"x {b}" for b in baselines]
              + [f"{i} peak MiB" for i in impls])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for batch, context in dict.fromkeys((r.batch, r.context) for r in rows):
        cells = [keyed.get((i, batch, context)) for i in impls]
        ours = keyed.get(("flashpatch", batch, context))
        speed = [(r.error or "-") if r is None or r.samples_per_s is None else f"{r.samples_per_s:.2f}" for r in cells]
        ratios = []
        for b in baselines:
            r = keyed.get((b, batch, context))
            ok = r is not None and r.samples_per_s and ours is not None and ours.samples_per_s
            ratios.append(f"{ours.samples_per_s / r.samples_per_s:.2f}x" if ok else "-")
        peaks = ["-" if r is None or r.peak_mib is None else f"{r.peak_mib:.0f}" for r in cells]
        lines.append("| " + " | ".join([f"{batch}x{context}", *speed, *ratios, *peaks]) + " |")
    return "\n".join(lines)
