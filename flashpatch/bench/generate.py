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

Batched prompts of mixed lengths (`plan_batches`, `bench_batched_generation`): each batch's prompts come from a
seeded distribution (lengths uniform over an integer range, with random tokens, or prompts drawn from a file's
lines), left-padded as generation wants (attention_mask zeros on the left), so every implementation meets a padding
mask. The batches are drawn before any run, the same for every implementation: cold, a fresh batch each repeat whose
padded length (and so every KV length of its generation) the process has not run where the distribution allows it
(up to 100 draws); warm, one batch repeated. Tokens/s counts the real new tokens (batch x new tokens, every row
generating exactly that many). Agreement is checked teacher-forced: one batch's prompts plus the first baseline's
greedy tokens go through each implementation's forward and the logits are compared at the real (non-pad)
positions; free-running greedy agreement on random weights would measure near-ties, not the kernels.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import random
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ..devices import max_memory_allocated_all, memory_allocated_all, reset_peak_memory_all, synchronize_all
from .switch import cell_word, failure_line, implementation_switcher


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


class _StepClock(LogitsProcessor):
    """Records when each new token's logits are ready (the first one ends the prefill)."""

    def __init__(self, sync):
        self.sync, self.times = sync, []

    def __call__(self, input_ids, scores):
        self.sync()
        self.times.append(time.perf_counter())
        return scores


def _generate_once(model, prompt, new_tokens: int, cache_kwargs=None,
                   attention_mask=None) -> tuple[float, float, float]:
    """(ttft s, decode s for new_tokens - 1 tokens, total s) of one greedy generate call (a left-padded batch
    comes with its attention_mask)."""
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
            mask = torch.ones_like(prompt) if attention_mask is None else attention_mask
            out = model.generate(prompt, attention_mask=mask, max_new_tokens=new_tokens,
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

    def generate(self, model, prompt, new_tokens, cache_kwargs, device, timed=True, attention_mask=None):
        """One generation (a warm-up when not timed); an OOM or any other failure ends the cell, recorded."""
        if self.error is not None:
            return
        base = memory_allocated_all() if device.type == "cuda" else 0  # every GPU: a model may span several
        if device.type == "cuda":
            reset_peak_memory_all()
        masked = {} if attention_mask is None else {"attention_mask": attention_mask}
        try:
            result = _generate_once(model, prompt, new_tokens, cache_kwargs, **masked)
        except Exception as exc:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            self.error = failure_line(exc)
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
    """Setup no cell should pay: the static cache's compile of the decode step (a 5-token prompt), and a short
    generation at an unused length in the context's power-of-two bucket: first-use autotuning of the prefill, and
    the decode kernels' first compiles (up to 17 steps: key lengths of either class, multiple of 16 or not, that
    Triton compiles apart). Without its decode steps a process's first cold cell paid them (a third of the warm
    cell's tokens/s at 2K on the H200)."""
    start = time.perf_counter()
    cache_kwargs = _cache_kwargs(cache, context, new_tokens)
    if cache == "static":
        _generate_once(model, torch.randint(0, vocab, (batch, 5), device=device), min(new_tokens, 8), cache_kwargs)
    length = min(context, (1 << (context - 1).bit_length()) // 2 + 1)
    steps = max(1, min(new_tokens, 17))
    lengths.mark(length, span=steps)
    _generate_once(model, torch.randint(0, vocab, (batch, length), device=device), steps, cache_kwargs)
    return time.perf_counter() - start


def positions_needed(contexts, repeats: int, new_tokens: int) -> int:
    """The positions a model needs for `bench_generation` at these contexts: cold repeats may run past the longest
    context (`_LengthSource` takes a free length above it when none is left below)."""
    return max(contexts) + (repeats + 2) * (new_tokens + 1)


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


@dataclass
class BatchRow:
    """One (implementation, regime) of batched mixed-length generation."""

    impl: str
    regime: str  # "cold" or "warm"
    batches: list  # each timed run's prompt lengths (real tokens of each row)
    padded_lengths: list  # each timed run's padded prompt length
    e2e_tok_s: float | None = None  # real new tokens (batch x new tokens) / end-to-end time, median over runs
    ttft_ms: float | None = None
    prefill_tok_s: float | None = None  # real prompt tokens / time to first token
    decode_tok_s: float | None = None
    peak_mib: float | None = None
    error: str | None = None
    cache: str = "dynamic"
    setup_s: float | None = None  # static-cache compile and a prefill per length bucket, before any cell
    e2e_runs_tok_s: list | None = None  # each run's end-to-end tokens/sec, in the order run

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PromptBatch:
    lengths: list[int]  # real tokens of each row
    ids: torch.Tensor  # [batch, padded], left-padded with token 0
    mask: torch.Tensor  # [batch, padded], 0 on the pads

    @property
    def padded(self) -> int:
        return self.ids.shape[1]


def left_padded(sequences: list[list[int]], device=None) -> PromptBatch:
    longest = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, longest - len(seq):] = torch.tensor(seq)
            mask[row, longest - len(seq):] = 1
    return PromptBatch([len(s) for s in sequences], ids.to(device), mask.to(device))


def _random_tokens(rng: random.Random, lengths, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(rng.getrandbits(62))
    return [torch.randint(1, vocab, (n,), generator=generator).tolist() for n in lengths]


class UniformLengths:
    """Prompt lengths uniform over the integers [low, high], random tokens."""

    def __init__(self, low: int, high: int, vocab: int):
        self.low, self.high, self.vocab = low, high, vocab

    def describe(self) -> str:
        return f"lengths uniform over the integers [{self.low}, {self.high}], random tokens"

    def bounds(self) -> tuple[int, int]:
        return self.low, self.high

    def draw(self, rng: random.Random, batch: int) -> list[list[int]]:
        return _random_tokens(rng, [rng.randint(self.low, self.high) for _ in range(batch)], self.vocab)


class FilePrompts:
    """Real prompts (token lists), each batch drawn at random from them: without replacement when there are at
    least a batch of them, else with."""

    def __init__(self, source: str, prompts: list[list[int]]):
        self.source, self.prompts = source, [p for p in prompts if p]

    def describe(self) -> str:
        low, high = self.bounds()
        return f"{len(self.prompts)} prompts of {self.source} ({low}-{high} tokens), drawn at random"

    def bounds(self) -> tuple[int, int]:
        return min(map(len, self.prompts)), max(map(len, self.prompts))

    def draw(self, rng: random.Random, batch: int) -> list[list[int]]:
        pool = range(len(self.prompts))
        picks = rng.sample(pool, batch) if len(pool) >= batch else rng.choices(pool, k=batch)
        return [self.prompts[i] for i in picks]


@dataclass
class BatchPlan:
    """Every batch a batched run generates, drawn before the first: the same for every implementation."""

    workload: str
    seed: int
    batch: int
    repeats: int  # timed runs per cell
    first_use: PromptBatch  # each implementation's first call: Triton compiles, library handles
    setup: list  # one 1-token prefill per power-of-two bucket of padded lengths the workload reaches
    cold: list
    warm: PromptBatch | None
    cold_unseen: list | None = None  # per cold batch: its KV lengths were new to the process (False: none was left)

    def longest(self) -> int:
        return max(b.padded for b in (self.first_use, *self.setup, *self.cold, *([self.warm] if self.warm else [])))

    def check_batch(self) -> PromptBatch:
        """The batch the agreement check runs: the warm batch, else the last cold one."""
        return self.warm if self.warm is not None else self.cold[-1]

    def to_dict(self) -> dict:
        return {"distribution": self.workload, "seed": self.seed, "batch": self.batch, "repeats": self.repeats,
                "cold": [b.lengths for b in self.cold], "cold_unseen": self.cold_unseen,
                "warm": self.warm.lengths if self.warm else None,
                "setup_padded_lengths": [b.padded for b in self.setup]}


def _overlaps(span: tuple[int, int], seen: list) -> bool:
    return any(span[0] <= hi and span[1] >= lo for lo, hi in seen)


def plan_batches(source, *, batch: int, new_tokens: int, repeats: int, regimes, seed: int, vocab: int,
                 device=None, attempts: int = 100) -> BatchPlan:
    """The run's batches from `source` (UniformLengths or FilePrompts), reproducible from `seed`. The cold
    batches avoid the padded lengths of everything before them (the first-use call, the setup prefills, earlier
    cold batches: each generation's KV lengths run from its padded length to padded + new_tokens)."""
    rng, side = random.Random(seed), random.Random(seed + 1)  # the setup's tokens leave the timed draws alone
    seen = [(9, 9 + 8)]
    first_use = left_padded(_random_tokens(side, [9, 5] * (batch // 2) + [9] * (batch % 2), vocab), device)
    low, high = source.bounds()
    setup = []
    bucket = 1 << max(0, (low - 1).bit_length())
    while bucket // 2 < high:
        length = next((n for n in range(max(low, bucket // 2 + 1), min(high, bucket) + 1)
                       if not _overlaps((n, n), seen)), None)
        if length is not None:
            seen.append((length, length))
            rows = [length] + [side.randint(min(low, length), length) for _ in range(batch - 1)]
            setup.append(left_padded(_random_tokens(side, rows, vocab), device))
        bucket *= 2
    cold, unseen = [], []
    for _ in range(repeats if "cold" in regimes else 0):
        for _ in range(attempts):
            sequences = source.draw(rng, batch)
            padded = max(map(len, sequences))
            fresh = not _overlaps((padded, padded + new_tokens), seen)
            if fresh:
                break
        seen.append((padded, padded + new_tokens))
        cold.append(left_padded(sequences, device))
        unseen.append(fresh)
    warm = left_padded(source.draw(rng, batch), device) if "warm" in regimes else None
    return BatchPlan(source.describe(), seed, batch, repeats, first_use, setup, cold, warm, unseen)


class _BatchCell(_Cell):
    """One (implementation, regime) of batched generation: its timed runs' batches besides the timings."""

    def __init__(self, impl, regime, cache, setup_s):
        super().__init__(impl, None, regime, cache, setup_s)
        self.batches = []

    def run(self, model, batch: PromptBatch, new_tokens, cache_kwargs, device, timed=True):
        done = len(self.results)
        self.generate(model, batch.ids, new_tokens, cache_kwargs, device, timed, attention_mask=batch.mask)
        if len(self.results) > done:
            self.batches.append(batch.lengths)

    def row(self, new_tokens) -> BatchRow:
        common = dict(cache=self.cache, setup_s=self.setup_s)
        if self.error is not None or not self.results:
            return BatchRow(self.impl, self.regime, self.batches, self.used, error=self.error or "no run", **common)
        rows = [len(lengths) for lengths in self.batches]
        e2e = [n * new_tokens / r[2] for n, r in zip(rows, self.results)]
        decode = [n * (new_tokens - 1) / r[1] for n, r in zip(rows, self.results) if r[1] > 0]
        prefill = [sum(lengths) / r[0] for lengths, r in zip(self.batches, self.results)]
        return BatchRow(self.impl, self.regime, self.batches, self.used, e2e_tok_s=statistics.median(e2e),
                        ttft_ms=statistics.median(r[0] for r in self.results) * 1e3,
                        prefill_tok_s=statistics.median(prefill),
                        decode_tok_s=statistics.median(decode) if decode else None, peak_mib=self.peak,
                        e2e_runs_tok_s=e2e, **common)


def _batch_setup(model, plan: BatchPlan, new_tokens: int, cache_kwargs: dict, cache: str) -> float:
    """Setup no cell should pay, timed: the static cache's compile (a short batch), then a 1-token prefill per
    length bucket (first-use autotuning and kernel variants at those lengths)."""
    start = time.perf_counter()
    if cache == "static":
        _generate_once(model, plan.first_use.ids, min(new_tokens, 8), cache_kwargs,
                       attention_mask=plan.first_use.mask)
    for batch in plan.setup:
        _generate_once(model, batch.ids, 1, cache_kwargs, attention_mask=batch.mask)
    return time.perf_counter() - start


def bench_batched_generation(model, plan: BatchPlan, *, new_tokens=128, baselines=("eager", "sdpa"),
                             regimes=("cold", "warm"), cache="dynamic", progress=None, on_regime=None):
    """(rows, agreement) for one model and plan: a row per (implementation, regime), and the teacher-forced
    agreement of each implementation with the first baseline (`teacher_forced_agreement`). Dynamic cache: the
    implementations take turns run by run, the order rotating; static cache: one implementation at a time (each
    compiles afresh). The model's own attention is restored at the end. `on_regime(rows)` is called with the rows
    so far after each regime."""
    device = next(model.parameters()).device
    cache_kwargs = {"cache_implementation": "static", "max_cache_len": plan.longest() + new_tokens} \
        if cache == "static" else {}
    rows = []
    with implementation_switcher(model, baselines) as (switch, impls, unavailable):
        rows += [BatchRow(impl, r, [], [], error=reason, cache=cache) for impl, reason in unavailable.items()
                 for r in regimes]
        for group in ([[impl] for impl in impls] if cache == "static" else [impls]):
            setup = {}
            for impl in group:
                switch(impl)
                with contextlib.suppress(Exception):  # the cells below fail the same way and record why
                    _generate_once(model, plan.first_use.ids, 8, attention_mask=plan.first_use.mask)
                if cache == "static":
                    torch._dynamo.reset()
                try:
                    setup[impl] = _batch_setup(model, plan, new_tokens, cache_kwargs, cache)
                except Exception:  # the cells below fail the same way and record why
                    setup[impl] = None
            for regime in regimes:  # cold first: the warm batch is not kept unseen
                cells = {impl: _BatchCell(impl, regime, cache, setup[impl]) for impl in group}
                if regime == "warm":
                    for impl in group:
                        switch(impl)
                        cells[impl].run(model, plan.warm, new_tokens, cache_kwargs, device, timed=False)
                batches = plan.cold if regime == "cold" else [plan.warm] * plan.repeats
                for repeat, batch in enumerate(batches):
                    turn = repeat % len(group)
                    for impl in (*group[turn:], *group[:turn]):
                        switch(impl)
                        cells[impl].run(model, batch, new_tokens, cache_kwargs, device)
                rows += [cell.row(new_tokens) for cell in cells.values()]
                if progress:
                    for _ in cells:
                        progress()
                if on_regime:
                    on_regime(_batch_order(rows, baselines))
        agreement = teacher_forced_agreement(model, switch, impls, plan.check_batch(), new_tokens)
    return _batch_order(rows, baselines), agreement


def _batch_order(rows: list[BatchRow], baselines) -> list[BatchRow]:
    order = {impl: i for i, impl in enumerate((*baselines, "flashpatch"))}
    regime = {"cold": 0, "warm": 1}
    return sorted(rows, key=lambda r: (regime.get(r.regime, 2), order.get(r.impl, len(order))))


def teacher_forced_agreement(model, switch, impls, batch: PromptBatch, new_tokens: int,
                             logits_bytes: int = 2**30) -> dict:
    """The first implementation (the reference) generates `new_tokens` greedy tokens after the batch's prompts;
    that token sequence, with its attention mask and the position ids generate uses, goes through every
    implementation's forward, and the logits are compared with the reference's at the real (non-pad) positions:
    the largest |difference| and the share of positions with the same top-1 token. Rows go through in chunks
    whose logits fit `logits_bytes` (a 128K vocabulary times 4K positions is 2 GB a row in fp32)."""
    if len(impls) < 2:
        return {"reference": None, "reason": "no baseline to compare with"}
    reference, others = impls[0], impls[1:]
    result = {"reference": reference, "prompt_lengths": batch.lengths, "new_tokens": new_tokens}
    try:
        switch(reference)
        with torch.no_grad():
            tokens = model.generate(batch.ids, attention_mask=batch.mask, max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    except Exception as exc:
        return {**result, "error": f"{reference} generation: {failure_line(exc)}"}
    mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1]).expand(-1, tokens.shape[1] - batch.padded)],
                     dim=1)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    rows_per_chunk = max(1, logits_bytes // (tokens.shape[1] * model.config.vocab_size * 4))
    stats = {impl: {"max_abs_logit_diff": 0.0, "same_top1": 0} for impl in others}
    errors, counted = {}, 0

    def logits(rows, real):
        with torch.no_grad():
            out = model(input_ids=tokens[rows], attention_mask=mask[rows], position_ids=positions[rows],
                        use_cache=False).logits
        return out[real].float()

    for start in range(0, tokens.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        real = mask[rows].bool()
        switch(reference)
        try:
            ref = logits(rows, real)
        except Exception as exc:
            return {**result, "error": f"{reference} forward: {failure_line(exc)}"}
        ref_top, counted = ref.argmax(-1), counted + ref.shape[0]
        for impl in others:
            if impl in errors:
                continue
            switch(impl)
            try:
                mine = logits(rows, real)
            except Exception as exc:
                errors[impl] = failure_line(exc)
                continue
            stats[impl]["max_abs_logit_diff"] = max(stats[impl]["max_abs_logit_diff"],
                                                    (mine - ref).abs().max().item())
            stats[impl]["same_top1"] += (mine.argmax(-1) == ref_top).sum().item()
            del mine
        del ref
    result["positions"] = counted
    result["impls"] = {impl: {"error": errors[impl]} if impl in errors else
                       {"max_abs_logit_diff": stats[impl]["max_abs_logit_diff"],
                        "top1_agreement": stats[impl]["same_top1"] / counted} for impl in others}
    return result


def batch_table(rows: list[BatchRow], baselines) -> tuple[list[str], list[list[str]]]:
    """A row per (regime, implementation), few columns: fits 80 columns. `x` on a baseline's row is flashpatch's
    speedup over it (median of per-run ratios); prefill in real prompt tokens/s."""
    header = ["regime", "impl", "tok/s", "x", "TTFT ms", "prefill", "decode", "peak MiB", "setup s"]
    keyed = {(r.impl, r.regime): r for r in rows}
    cells = []
    for regime in dict.fromkeys(r.regime for r in rows):
        ours = keyed.get(("flashpatch", regime))
        for impl in (*baselines, "flashpatch"):
            r = keyed.get((impl, regime))
            if r is None:
                continue
            ratio = paired_speedup(ours, r) if ours is not None and impl != "flashpatch" else None
            speed = _fmt(r.e2e_tok_s) if r.e2e_tok_s is not None else cell_word(r.error)
            cells.append([regime, impl, speed, "" if ratio is None else f"{ratio:.2f}", _fmt(r.ttft_ms, ".0f"),
                          _fmt(r.prefill_tok_s, ".0f"), _fmt(r.decode_tok_s), _fmt(r.peak_mib, ".0f"),
                          _fmt(r.setup_s)])
    return header, cells


def batch_markdown(rows: list[BatchRow], baselines) -> str:
    header, cells = batch_table(rows, baselines)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines)


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
            speed = _fmt(r.e2e_tok_s) if r.e2e_tok_s is not None else cell_word(r.error)
            ratio = rec.get(f"x_{impl}")
            cells.append([str(rec["context"]), rec["regime"], impl, speed, "" if ratio is None else f"{ratio:.2f}",
                          _fmt(r.ttft_ms, ".0f"), _fmt(r.decode_tok_s), _fmt(r.peak_mib, ".0f"), _fmt(r.setup_s)])
    return header, cells


def markdown(rows: list[GenRow], baselines) -> str:
    header, cells = table_rows(rows, baselines)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines)
