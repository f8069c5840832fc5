"""Generation benchmark: time to first token, decode and end-to-end tokens/sec, peak memory, by context.

Implementations run side by side in one process: the baselines as transformers ships them
(`eager`, `sdpa`) and flashpatch, taking turns repeat by repeat within each context and regime (a
dynamic cache; a static cache's compile keeps one implementation at a time). Greedy, exactly N new
tokens. Two regimes:
- cold: every repeat uses prompt (and so KV) lengths this process has not seen, as a user's new
  prompts do (SDPA's cuDNN backend builds a plan per new length);
- warm: one warm-up call, then the same call repeated.
Two caches: `dynamic` (transformers' default DynamicCache) and `static` (StaticCache sized
context + new tokens, which transformers' generate compiles with torch.compile on a GPU).
Before a context's cells, every implementation gets the same per-context warm-up, reported as setup_s: the
static cache's compile, and one prefill at a length of the context's power-of-two bucket that no cell uses
(flashpatch's autotuner times its tile candidates once per bucket and keeps the answer on disk, so a user's new
prompt meets that cost only once per machine; the cells' own lengths stay unseen).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ..devices import max_memory_allocated_all, memory_allocated_all, reset_peak_memory_all, synchronize_all
from .switch import implementation_switcher


@dataclass
class GenRow:
    impl: str
    context: int
    regime: str  # "cold" or "warm"
    prompt_lengths: list
    ttft_ms: float | None = None
    decode_tok_s: float | None = None
    e2e_tok_s: float | None = None
    peak_mib: float | None = None
    error: str | None = None
    cache: str = "dynamic"
    setup_s: float | None = None  # the per-context warm-up: static-cache compile, first-use autotuning
    e2e_runs_tok_s: list | None = None  # each repeat's end-to-end tokens/sec, in the order run (the spread)

    def to_dict(self) -> dict:
        return asdict(self)


def _failure(exc: Exception) -> str:
    """A failed cell's one line: OOM, a flashpatch call that would have run the original attention (the cell is
    not timed then), or the exception."""
    from ..adapter import FallbackError

    if isinstance(exc, torch.OutOfMemoryError):
        return "OOM"
    if isinstance(exc, FallbackError):
        return f"not served: {str(exc).split(': ', 1)[-1]}"[:160]
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:160]


class _StepClock(LogitsProcessor):
    """Records when each new token's logits are ready (the first one ends the prefill)."""

    def __init__(self, sync):
        self.sync, self.times = sync, []

    def __call__(self, input_ids, scores):
        self.sync()
        self.times.append(time.perf_counter())
        return scores


def _generate_once(model, prompt, new_tokens: int, cache_kwargs=None) -> tuple[float, float, float]:
    """(ttft s, decode s for new_tokens - 1 tokens, total s) of one greedy generate call."""
    sync = synchronize_all if prompt.is_cuda else (lambda: None)
    clock = _StepClock(sync)
    # As timeit does: no garbage collection inside the timed call (whichever implementation a collection
    # happened to land in would pay for everyone's garbage); collected before instead.
    gc.collect()
    collecting = gc.isenabled()
    gc.disable()
    try:
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                                 logits_processor=LogitsProcessorList([clock]), **(cache_kwargs or {}))
        sync()
        end = time.perf_counter()
    finally:
        if collecting:
            gc.enable()
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return clock.times[0] - start, end - clock.times[0], end - start


class _LengthSource:
    """Prompt lengths for cold runs: each run's KV lengths [L, L + new_tokens] unseen by the process. The context
    itself if it is unseen, else the nearest free length below it (down to half the context), else above it."""

    def __init__(self, new_tokens: int):
        self.span, self.seen = new_tokens + 1, []

    def fresh(self, context: int) -> int:
        below = range(context, max(1, context // 2) - 1, -self.span)
        for length in itertools.chain(below, itertools.count(context + self.span, self.span)):
            if not any(length <= hi and length + self.span - 1 >= lo for lo, hi in self.seen):
                break
        self.seen.append((length, length + self.span - 1))
        return length

    def mark(self, length: int, span: int | None = None):
        self.seen.append((length, length + (span or self.span) - 1))


def _cache_kwargs(cache: str, context: int, new_tokens: int) -> dict:
    if cache == "static":
        return {"cache_implementation": "static", "max_cache_len": context + new_tokens}
    return {}


class _Cell:
    """One (implementation, context, regime): its timed generations, added one at a time, and its failure if any."""

    def __init__(self, impl, context, regime, cache, setup_s):
        self.impl, self.context, self.regime, self.cache, self.setup_s = impl, context, regime, cache, setup_s
        self.results, self.used, self.peak, self.error = [], [], None, None

    def generate(self, model, prompt, new_tokens, cache_kwargs, device, timed=True):
        """One generation (a warm-up when not timed); an OOM or any other failure ends the cell, recorded."""
        if self.error is not None:
            return
        base = memory_allocated_all() if device.type == "cuda" else 0  # every GPU: a model may span several
        if device.type == "cuda":
            reset_peak_memory_all()
        try:
            result = _generate_once(model, prompt, new_tokens, cache_kwargs)
        except Exception as exc:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            self.error = _failure(exc)
            return
        if device.type == "cuda":
            self.peak = max(self.peak or 0.0, (max_memory_allocated_all() - base) / 2**20)
        if timed:
            self.results.append(result)
            self.used.append(prompt.shape[1])

    def row(self, batch, new_tokens) -> GenRow:
        common = dict(cache=self.cache, setup_s=self.setup_s)
        if self.error is not None or not self.results:
            return GenRow(self.impl, self.context, self.regime, self.used, error=self.error or "no run", **common)
        ttft, decode, total = (statistics.median(r[i] for r in self.results) for i in range(3))
        return GenRow(self.impl, self.context, self.regime, self.used, ttft_ms=ttft * 1e3,
                      decode_tok_s=batch * (new_tokens - 1) / decode if decode > 0 else None,
                      e2e_tok_s=batch * new_tokens / total, peak_mib=self.peak,
                      e2e_runs_tok_s=[batch * new_tokens / r[2] for r in self.results], **common)


def _regime_cells(model, switch, impls, context, regime, lengths, setup, new_tokens, batch, repeats, vocab,
                  device, cache) -> list[_Cell]:
    """A regime's cells for these implementations, repeat by repeat in turn, so that a host whose speed drifts
    (shared machines' do) moves every implementation alike; the turn order rotates each repeat, so that none always
    follows the same neighbour (whose memory and clocks it would inherit). Warm: one untimed call each, then the
    same prompt again; cold: each repeat a prompt length its implementation has not seen."""
    cache_kwargs = _cache_kwargs(cache, context, new_tokens)
    cells = {impl: _Cell(impl, context, regime, cache, setup[impl]) for impl in impls}
    prompt = torch.randint(0, vocab, (batch, context), device=device)
    if regime == "warm":
        for impl in impls:
            switch(impl)
            lengths[impl].mark(context)
            cells[impl].generate(model, prompt, new_tokens, cache_kwargs, device, timed=False)
    for repeat in range(repeats):
        turn = repeat % len(impls)
        for impl in (*impls[turn:], *impls[:turn]):
            switch(impl)
            if regime == "cold":
                prompt = torch.randint(0, vocab, (batch, lengths[impl].fresh(context)), device=device)
            cells[impl].generate(model, prompt, new_tokens, cache_kwargs, device)
    return list(cells.values())


def _context_warmup(model, context, new_tokens, batch, vocab, device, cache, lengths) -> float:
    """Setup no cell should pay: the static cache's compile of the decode step (a 5-token prompt), and a
    one-token generation at an unused length in the context's power-of-two bucket (first-use autotuning)."""
    start = time.perf_counter()
    cache_kwargs = _cache_kwargs(cache, context, new_tokens)
    if cache == "static":
        _generate_once(model, torch.randint(0, vocab, (batch, 5), device=device), min(new_tokens, 8), cache_kwargs)
    length = min(context, (1 << (context - 1).bit_length()) // 2 + 1)
    lengths.mark(length, span=1)
    _generate_once(model, torch.randint(0, vocab, (batch, length), device=device), 1, cache_kwargs)
    return time.perf_counter() - start


def bench_generation(model, *, contexts, new_tokens=128, batch=1, baselines=("eager", "sdpa"), repeats=2,
                     regimes=("cold", "warm"), cache="dynamic", progress=None, on_context=None) -> list[GenRow]:
    """All cells for one model. The model's own attention is restored at the end. `on_context(rows)` is called
    with the rows so far after each context (a caller can save them: a long run may be cut off)."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    rows = []
    lengths: dict[str, _LengthSource] = {}
    with implementation_switcher(model, baselines) as (switch, impls, unavailable):
        for context in contexts:
            rows += [GenRow(impl, context, r, [], error=reason) for impl, reason in unavailable.items()
                     for r in regimes]
            # Dynamic cache: all implementations in turn, repeat by repeat. Static cache: one implementation at a
            # time, each compiling afresh in its setup (switching back and forth would recompile, or hit dynamo's
            # recompile limit and silently run uncompiled).
            for group in ([[impl] for impl in impls] if cache == "static" else [impls]):
                setup = {}
                for impl in group:
                    switch(impl)
                    if impl not in lengths:
                        # Same lengths for every implementation; each one's history starts with a short warm-up
                        # (Triton compiles, cuBLAS/cuDNN handles) that leaves the measured lengths unseen.
                        lengths[impl] = _LengthSource(new_tokens)
                        lengths[impl].mark(9, span=8)
                        with contextlib.suppress(Exception):  # the cells below fail the same way and record why
                            _generate_once(model, torch.randint(0, vocab, (batch, 9), device=device), 8)
                    if cache == "static":
                        torch._dynamo.reset()
                    try:
                        setup[impl] = _context_warmup(model, context, new_tokens, batch, vocab, device, cache,
                                                      lengths[impl])
                    except Exception:  # the cells below fail the same way and record why
                        setup[impl] = None
                for regime in regimes:  # cold first: a warm call would make its lengths seen
                    cells = _regime_cells(model, switch, group, context, regime, lengths, setup, new_tokens, batch,
                                          repeats, vocab, device, cache)
                    rows += [cell.row(batch, new_tokens) for cell in cells]
                    if progress:
                        for _ in cells:
                            progress()
            if on_context:
                on_context(_in_table_order(rows, baselines))
    return _in_table_order(rows, baselines)


def _in_table_order(rows: list[GenRow], baselines) -> list[GenRow]:
    order = {impl: i for i, impl in enumerate((*baselines, "flashpatch"))}
    return sorted(rows, key=lambda r: (order.get(r.impl, len(order)), r.context))


def paired_ratios(ours: GenRow, base: GenRow) -> list[float]:
    """flashpatch's end-to-end rate over a baseline's, repeat by repeat (empty where the repeats don't pair up)."""
    mine, theirs = ours.e2e_runs_tok_s or [], base.e2e_runs_tok_s or []
    if len(mine) != len(theirs) or ours.error or base.error:
        return []
    return [a / b for a, b in zip(mine, theirs)]


def paired_speedup(ours: GenRow, base: GenRow) -> float | None:
    """flashpatch's end-to-end speedup over a baseline: the median, over repeats, of the ratio within one repeat
    (whose runs are back to back: a drift of the host's speed, which moved single runs by 20-30 % on H100 hosts,
    then cancels), falling back to the ratio of medians where the repeats don't pair up."""
    if not (ours.e2e_tok_s and base.e2e_tok_s):
        return None
    ratios = paired_ratios(ours, base)
    return statistics.median(ratios) if ratios else ours.e2e_tok_s / base.e2e_tok_s


def speedup_table(rows: list[GenRow], baselines) -> list[dict]:
    """One record per (context, regime): each implementation's numbers and flashpatch's ratios (`paired_speedup`)."""
    keyed = {(r.impl, r.context, r.regime): r for r in rows}
    records = []
    for context in sorted({r.context for r in rows}):
        for regime in ("cold", "warm"):
            ours = keyed.get(("flashpatch", context, regime))
            if ours is None:
                continue
            rec = {"context": context, "regime": regime}
            for impl in (*baselines, "flashpatch"):
                r = keyed.get((impl, context, regime))
                rec[impl] = r
                if impl != "flashpatch":
                    rec[f"x_{impl}"] = paired_speedup(ours, r) if r is not None else None
            records.append(rec)
    return records


def plot(rows: list[GenRow], path: str, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured_memory = any(r.peak_mib is not None for r in rows)  # a GPU's; none on a CPU
    fig, axes = plt.subplots(1, 2 if measured_memory else 1, figsize=(12 if measured_memory else 6.5, 4.5),
                             squeeze=False)
    ax_speed, ax_mem = axes[0][0], (axes[0][1] if measured_memory else None)
    for impl in dict.fromkeys(r.impl for r in rows):
        for regime, style in (("cold", "--"), ("warm", "-")):
            pts = sorted((r.context, r.e2e_tok_s, r.peak_mib) for r in rows
                         if r.impl == impl and r.regime == regime and r.e2e_tok_s)
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ax_speed.plot(xs, [p[1] for p in pts], style, marker="o", label=f"{impl} ({regime})")
            if ax_mem is not None and regime == "warm" and all(p[2] is not None for p in pts):
                ax_mem.plot(xs, [p[2] / 1024 for p in pts], marker="o", label=impl)
    for ax, ylabel in ((ax_speed, "end-to-end tokens/s"), (ax_mem, "peak memory above weights (GiB)")):
        if ax is None:
            continue
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (prompt tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def attention_names() -> list[str]:
    """The attention implementations transformers knows by name: what --baselines may list."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ["eager", *(name for name in ALL_ATTENTION_FUNCTIONS.valid_keys() if "|" not in name)]


def _fmt(value, spec=".1f"):
    return "-" if value is None else format(value, spec)


def table_rows(rows: list[GenRow], baselines) -> tuple[list[str], list[list[str]]]:
    """Header and cells shared by the terminal table and BENCHMARKS.md."""
    impls = (*baselines, "flashpatch")
    header = (["context", "regime"] + [f"{i} tok/s" for i in impls] + [f"x {b}" for b in baselines]
              + [f"{i} TTFT ms" for i in impls] + ["flashpatch decode tok/s"] + [f"{i} peak MiB" for i in impls])
    setup = any(r.setup_s is not None for r in rows)
    if setup:
        header += [f"{i} setup s" for i in impls]
    cells = []
    for rec in speedup_table(rows, baselines):
        get = [rec.get(i) for i in impls]
        cell = [str(rec["context"]), rec["regime"]]
        cell += [(r.error or "-") if r is None or r.e2e_tok_s is None else _fmt(r.e2e_tok_s) for r in get]
        cell += ["-" if rec[f"x_{b}"] is None else f"{rec[f'x_{b}']:.2f}x" for b in baselines]
        cell += [_fmt(r.ttft_ms if r else None, ".0f") for r in get]
        cell += [_fmt(rec["flashpatch"].decode_tok_s)]
        cell += [_fmt(r.peak_mib if r else None, ".0f") for r in get]
        if setup:
            cell += [_fmt(r.setup_s if r else None) for r in get]
        cells.append(cell)
    return header, cells


def terminal_table(rows: list[GenRow], baselines) -> tuple[list[str], list[list[str]]]:
    """A row per (context, regime, implementation), few columns: fits 80 columns, so logs and CI keep every cell.
    `x` on a baseline's row is flashpatch's speedup over it."""
    header = ["context", "regime", "impl", "tok/s", "x", "TTFT ms", "decode", "peak MiB", "setup s"]
    cells = []
    for rec in speedup_table(rows, baselines):
        for impl in (*baselines, "flashpatch"):
            r = rec.get(impl)
            if r is None:
                continue
            speed = _fmt(r.e2e_tok_s) if r.e2e_tok_s is not None else (r.error or "-")
            ratio = rec.get(f"x_{impl}")
            cells.append([str(rec["context"]), rec["regime"], impl, speed, "" if ratio is None else f"{ratio:.2f}",
                          _fmt(r.ttft_ms, ".0f"), _fmt(r.decode_tok_s), _fmt(r.peak_mib, ".0f"), _fmt(r.setup_s)])
    return header, cells


def markdown(rows: list[GenRow], baselines) -> str:
    header, cells = table_rows(rows, baselines)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines)
