"""Training-step benchmark: throughput and peak memory of forward + backward + AdamW step.

The baselines as transformers ships them (`eager`, `sdpa`) and flashpatch side by side in one process, bf16
weights on a GPU. Two workloads:
- shapes: (batch, context) of random tokens, every row full (`bench_training`);
- mixed lengths (`bench_layouts`): sequences whose lengths are drawn from a seeded distribution, in two layouts,
  `padded` (a right-padded batch with its attention mask, labels -100 on the pads) and `packed` (what transformers'
  DataCollatorWithFlattening builds: one row, the sequences end to end, position_ids restarting at each sequence,
  no attention mask, label -100 at each sequence's first token). Both layouts train on the same tokens and the same
  label positions, so their losses agree too. Every implementation starts each layout from the same weights, so
  the first step's losses compare the implementations (they should agree to the dtype's rounding).
An out-of-memory cell, or any other failure, is recorded in its row and the run goes on.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from .switch import cell_word, each_implementation, failure_line

LAYOUTS = ("padded", "packed")


@dataclass
class TrainRow:
    impl: str
    batch: int  # rows of the batch (a packed batch has one)
    context: int  # the batch's row length (padded: the longest sequence; packed: all of them)
    samples_per_s: float | None = None
    step_ms: float | None = None
    peak_mib: float | None = None
    error: str | None = None
    layout: str | None = None  # "padded" or "packed" for mixed-length sequences; None for full (batch, context)
    tokens: int | None = None  # real (non-pad) tokens per step
    tokens_per_s: float | None = None
    loss: float | None = None  # the first step's loss, from the weights every implementation starts at
    losses: list | None = None  # every step's loss, the untimed warm-up step first

    def to_dict(self) -> dict:
        return asdict(self)


def _step(model, optimizer, ids, labels=None, **inputs):
    loss = model(input_ids=ids, labels=ids if labels is None else labels, use_cache=False, **inputs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def _run_steps(model, inputs: dict, steps: int, device) -> tuple[list[float], list[float], float | None]:
    """(timed step seconds, every step's loss, peak MiB on a GPU) of one warm-up step (kernels compile, the
    optimizer's state is allocated) and `steps` timed ones. Raises what the steps raise."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    extra = {k: v for k, v in inputs.items() if k != "input_ids"}
    ids = inputs["input_ids"]
    try:
        losses = [_step(model, optimizer, ids, **extra).detach()]
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            losses.append(_step(model, optimizer, ids, **extra).detach())
            sync()
            times.append(time.perf_counter() - start)
        if not torch.isfinite(losses[-1]):
            raise FloatingPointError(f"loss is {losses[-1].item()}")
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
        return times, [loss.item() for loss in losses], peak
    finally:
        del optimizer
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _cell(model, impl, batch, context, steps, device) -> TrainRow:
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
    try:
        times, _, peak = _run_steps(model, {"input_ids": ids}, steps, device)
    except Exception as exc:  # OOM or any failure of one shape: record it, go on
        return TrainRow(impl, batch, context, error=failure_line(exc))
    step = statistics.median(times)
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


def draw_lengths(tokens: int, low: int, high: int, seed: int) -> list[int]:
    """Sequence lengths drawn uniformly from the integers [low, high] (seeded) until they hold `tokens` tokens, the
    last one cut to fit."""
    rng, lengths = random.Random(seed), []
    while sum(lengths) < tokens:
        lengths.append(min(rng.randint(low, high), tokens - sum(lengths)))
    return lengths


def random_sequences(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=generator).tolist() for n in lengths]


def layout_inputs(layout: str, sequences: list[list[int]], device=None) -> dict:
    """The model's inputs (labels included) for `sequences` in a layout; see the module's docstring."""
    if layout == "packed":
        from transformers import DataCollatorWithFlattening

        batch = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": s} for s in sequences])
        return {key: batch[key].to(device) for key in ("input_ids", "labels", "position_ids")}
    if layout != "padded":
        raise ValueError(f"layout {layout!r}: one of {', '.join(LAYOUTS)}")
    longest = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def _snapshot(model) -> list[torch.Tensor]:
    return [p.detach().to("cpu", copy=True) for p in model.parameters()]


def _restore(model, snapshot: list[torch.Tensor]):
    with torch.no_grad():
        for param, saved in zip(model.parameters(), snapshot):
            param.copy_(saved)


def _layout_cell(model, impl, layout, sequences, steps, device, snapshot, seed) -> TrainRow:
    inputs = layout_inputs(layout, sequences, device)
    batch, context = inputs["input_ids"].shape
    tokens = sum(len(s) for s in sequences)
    common = dict(layout=layout, tokens=tokens)
    _restore(model, snapshot)
    torch.manual_seed(seed)  # dropout outside attention, where a config has it, draws the same masks
    try:
        times, losses, peak = _run_steps(model, inputs, steps, device)
    except Exception as exc:  # OOM or any failure of one cell: record it, go on
        return TrainRow(impl, batch, context, error=failure_line(exc), **common)
    step = statistics.median(times)
    return TrainRow(impl, batch, context, batch / step, step * 1e3, peak, tokens_per_s=tokens / step,
                    loss=losses[0], losses=losses, **common)


def bench_layouts(model, sequences: list[list[int]], *, layouts=LAYOUTS, baselines=("eager", "sdpa"), steps=3,
                  seed=0, progress=None) -> list[TrainRow]:
    """One row per (implementation, layout) of the same sequences; every cell starts from the model's weights as
    given (restored after each), and the model's attention is restored at the end."""
    device = next(model.parameters()).device
    model.train()
    snapshot = _snapshot(model)
    rows = []
    try:
        for impl, unavailable in each_implementation(model, baselines):
            for layout in layouts:
                rows.append(TrainRow(impl, 0, 0, error=unavailable, layout=layout) if unavailable
                            else _layout_cell(model, impl, layout, sequences, steps, device, snapshot, seed))
                if progress:
                    progress()
    finally:
        _restore(model, snapshot)
    return rows


def loss_agreement(rows: list[TrainRow], reference: str | None = None) -> dict:
    """Per layout: each implementation's first-step loss and its relative difference from the reference's (the
    first implementation with a loss, unless named)."""
    out = {}
    for layout in dict.fromkeys(r.layout for r in rows if r.layout):
        losses = {r.impl: r.loss for r in rows if r.layout == layout and r.loss is not None}
        ref = reference if reference in losses else next(iter(losses), None)
        out[layout] = {"reference": ref, "losses": losses,
                       "rel_diff": {impl: abs(loss - losses[ref]) / max(abs(losses[ref]), 1e-12)
                                    for impl, loss in losses.items() if impl != ref} if ref else {}}
    return out


def loss_agreement_lines(agreement: dict) -> list[str]:
    """A line per layout of `loss_agreement` that compared implementations: each one's relative difference from
    the reference's loss."""
    return [f"{layout} loss, relative difference from {entry['reference']}: "
            + ", ".join(f"{impl} {diff:.2g}" for impl, diff in entry["rel_diff"].items())
            for layout, entry in agreement.items() if entry["rel_diff"]]


def layout_table(rows: list[TrainRow], baselines) -> tuple[list[str], list[list[str]]]:
    """A row per (layout, implementation), few columns (fits 80): real tokens/s, flashpatch's speedup over the row,
    step time, peak memory, first-step loss."""
    header = ["layout", "impl", "rows x len", "tok/s", "x", "step ms", "peak MiB", "loss"]
    keyed = {(r.layout, r.impl): r for r in rows}
    cells = []
    for layout in dict.fromkeys(r.layout for r in rows):
        ours = keyed.get((layout, "flashpatch"))
        for impl in (*baselines, "flashpatch"):
            r = keyed.get((layout, impl))
            if r is None:
                continue
            ratio = ""
            if impl != "flashpatch" and ours and ours.tokens_per_s and r.tokens_per_s:
                ratio = f"{ours.tokens_per_s / r.tokens_per_s:.2f}"
            shape = f"{r.batch}x{r.context}" if r.batch else "-"
            speed = f"{r.tokens_per_s:.1f}" if r.tokens_per_s is not None else cell_word(r.error)
            cells.append([layout, impl, shape, speed, ratio, _fmt(r.step_ms, ".1f"), _fmt(r.peak_mib, ".0f"),
                          _fmt(r.loss, ".6f")])
    return header, cells


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def layout_markdown(rows: list[TrainRow], baselines=("eager", "sdpa")) -> str:
    header, cells = layout_table(rows, baselines)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines)


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
