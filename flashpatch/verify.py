"""verify: the same model unpatched and patched on the same text; perplexity, logits, generation, verdict."""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .devices import model_devices, synchronize_all
from .loading import LoadedModel
from .ops import kernels_used
from .patch import PatchReport, apply, patched, unapply
from .usage import UsageError, at_least

# Exit codes of `flashpatch verify` (and `bench` for NOT SERVED).
EXIT_CODES = {"PASS": 0, "FAIL": 1, "NOT SERVED": 3}


@dataclass
class VerifyOptions:
    context: int
    stride: int
    max_tokens: int | None = None
    generate_tokens: int = 128
    tolerance_pct: float = 0.1  # relative perplexity difference allowed, in percent
    # Optional second criterion. Off by default: in bf16 a near-tied argmax flips under any change of
    # summation order (measured on the H100: 97.8 % top-1 agreement at 0.011 % perplexity difference).
    min_top1: float | None = None

    def check(self) -> None:
        """UsageError naming the first option out of range."""
        at_least("--context", self.context, 2, " tokens (a window scores all but its first token)")
        at_least("--stride", self.stride, 1)
        if self.stride > self.context:
            raise UsageError(f"--stride {self.stride}: must be at most --context ({self.context})")
        at_least("--max-tokens", self.max_tokens, 2, " (a perplexity needs two tokens)")
        at_least("--generate-tokens", self.generate_tokens, 0)
        at_least("--tolerance", self.tolerance_pct, 0)
        if self.min_top1 is not None and not 0 <= self.min_top1 <= 1:
            raise UsageError(f"--min-top1 {self.min_top1}: a fraction from 0 to 1 (0.98 = 98 %)")

    def fit_positions(self, config) -> str | None:
        """Shorten the windows to the model's positions where they are longer; what changed, or None."""
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if not limit or self.context <= limit:
            return None
        message = f"--context {self.context} is past the model's {limit} positions: using {limit}."
        self.context, self.stride = limit, min(self.stride, limit)
        return message


@dataclass
class VerifyResult:
    model: str
    text_source: str
    baseline_impl: str
    kernel_path: str
    dtype: str
    device: str
    tokens: int
    windows: int
    context: int
    stride: int
    ppl_baseline: float
    ppl_patched: float
    ppl_rel_diff_pct: float
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    top1_agreement: float
    generate_tokens: int
    generation_identical: bool
    first_divergence: int | None  # index among generated tokens, None if identical
    seconds_baseline: float
    seconds_patched: float
    patched: bool = True
    layers_patched: int = 0
    reasons: list = field(default_factory=list)  # why flashpatch left the model as it is
    fallbacks: dict = field(default_factory=dict)  # calls that ran the model's own attention: reason -> count
    kernels: list = field(default_factory=list)  # flashpatch.kernels_used(): the process's kinds of call, kernel, why
    tolerance_pct: float = 0.1
    min_top1: float | None = None

    @property
    def failures(self) -> list[str]:
        """The parity criteria this run missed, each saying by how much."""
        failed = []
        if not self.ppl_rel_diff_pct <= self.tolerance_pct:  # NaN fails too
            failed.append(f"perplexity differs by {self.ppl_rel_diff_pct:.4g} %, more than --tolerance "
                          f"{self.tolerance_pct:g} %")
        if self.min_top1 is not None and not self.top1_agreement >= self.min_top1:
            failed.append(f"top-1 agreement {self.top1_agreement:.4%} is below --min-top1 {self.min_top1:.4%}")
        return failed

    @property
    def verdict(self) -> str:
        """FAIL: a criterion missed. NOT SERVED: flashpatch did not serve the model, or some of its attention calls
        ran the original attention (then the numbers compare that with itself). PASS: neither."""
        if self.failures:
            return "FAIL"
        return "NOT SERVED" if not self.patched or self.fallbacks else "PASS"

    @property
    def passed(self) -> bool:
        return self.verdict == "PASS"

    def to_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict, "failures": self.failures}


def serving_report(model) -> PatchReport:
    """What `apply` would do to this model here (applied, then undone). Its warnings are not printed: the report
    carries the same reasons, and the CLI shows them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = apply(model)
    unapply(model)
    if report.patched and not report.kernel_path["name"].startswith("triton"):
        report.patched, report.layers_patched = False, 0
        report.reasons.append(f"kernels unavailable on this device: {report.kernel_path['reason']}")
    return report


def not_served_result(loaded: LoadedModel, report: PatchReport, text_source: str, opts: VerifyOptions) -> dict:
    """verify's JSON for a model flashpatch does not serve: no parity numbers, since nothing of ours ran."""
    model = loaded.model
    return {"model": loaded.description, "text_source": text_source, "baseline_impl": model.config._attn_implementation,
            "kernel_path": report.kernel_path["name"], "patched": False, "layers_patched": 0,
            "reasons": report.reasons, "fallbacks": {}, "context": opts.context, "stride": opts.stride,
            "verdict": "NOT SERVED", "failures": []}


def strided_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) per window: transformers' strided perplexity recipe. Each token is scored once,
    with up to `context - stride` tokens of left context from the previous window."""
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        windows.append((begin, end, end - prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def _timed_logits(model, input_ids) -> tuple[torch.Tensor, float]:
    sync = synchronize_all if input_ids.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(input_ids).logits
    sync()
    return logits[0].float(), time.perf_counter() - start


def _greedy(model, prompt, n_tokens, pad_id) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False,
                             pad_token_id=pad_id)
    return out[0, prompt.shape[1]:].cpu()


def text_tokens(loaded: LoadedModel, text: str, opts: VerifyOptions) -> list[int]:
    """The token ids verify scores; UsageError for a text of fewer than two tokens."""
    ids = loaded.encode(text)
    if opts.max_tokens:
        ids = ids[: opts.max_tokens]
    if len(ids) < 2:
        raise UsageError(f"the text is {len(ids)} token long; verify needs at least 2 (give a longer --text)")
    return ids


@contextlib.contextmanager
def exact_baseline(model, report: PatchReport):
    """The model on an attention implementation that computes what its config asks, for the unpatched side; yields
    that implementation's name. transformers' sdpa entry drops logit softcapping (SDPA has none), yet 5.17 lets
    Gemma 2 load with it: there the baseline is eager. The model's own implementation is restored afterwards."""
    original = model.config._attn_implementation
    if report.features.get("softcap") and original == "sdpa":
        model.set_attn_implementation("eager")
    try:
        yield model.config._attn_implementation
    finally:
        model.set_attn_implementation(original)


def run_verify(loaded: LoadedModel, tokens: list[int], text_source: str, opts: VerifyOptions,
               progress: Callable[[int, int], None] | None = None) -> VerifyResult:
    """Unpatched vs patched over the same windows of `tokens` (`text_tokens`) and greedy generation."""
    report = serving_report(loaded.model)
    with exact_baseline(loaded.model, report) as baseline_impl:
        return _compare(loaded, tokens, text_source, opts, progress, report, baseline_impl)


def _compare(loaded, tokens, text_source, opts, progress, report, baseline_impl) -> VerifyResult:
    model = loaded.model
    device = next(model.parameters()).device
    ids = torch.tensor(tokens, device=device)
    windows = strided_windows(len(ids), opts.context, opts.stride)
    fallbacks = Counter()

    nll = {"base": 0.0, "patched": 0.0}
    seconds = {"base": 0.0, "patched": 0.0}
    scored = agree = 0
    max_diff, sum_diff, n_diff = 0.0, 0.0, 0
    for i, (begin, end, n_scored) in enumerate(windows):
        window = ids[begin:end][None]
        # positions predicting the last n_scored tokens (the first token of the text is never scored)
        first = max(end - begin - n_scored, 1) - 1
        targets = window[0, first + 1:]
        base, t_base = _timed_logits(model, window)
        with _quiet_patch(model) as patch_report:
            ours, t_ours = _timed_logits(model, window)
        fallbacks.update(patch_report.fallbacks)
        seconds["base"] += t_base
        seconds["patched"] += t_ours
        for key, logits in (("base", base), ("patched", ours)):
            nll[key] += torch.nn.functional.cross_entropy(logits[first:-1], targets, reduction="sum").item()
        diff = (ours[first:-1] - base[first:-1]).abs()
        max_diff = max(max_diff, diff.max().item())
        sum_diff += diff.sum().item()
        n_diff += diff.numel()
        agree += (ours[first:-1].argmax(-1) == base[first:-1].argmax(-1)).sum().item()
        scored += targets.numel()
        if progress:
            progress(i + 1, len(windows))

    pad_id = getattr(model.generation_config, "pad_token_id", None) or getattr(model.config, "eos_token_id", 0) or 0
    if isinstance(pad_id, list):
        pad_id = pad_id[0]
    prompt = ids[: min(32, len(ids))][None]
    gen_base = gen_ours = torch.zeros(0)
    if opts.generate_tokens:
        gen_base = _greedy(model, prompt, opts.generate_tokens, pad_id)
        with _quiet_patch(model) as patch_report:
            gen_ours = _greedy(model, prompt, opts.generate_tokens, pad_id)
        fallbacks.update(patch_report.fallbacks)
    differs = (gen_base != gen_ours).nonzero()
    ppl_base, ppl_ours = math.exp(nll["base"] / scored), math.exp(nll["patched"] / scored)
    return VerifyResult(
        model=loaded.description, text_source=text_source, baseline_impl=baseline_impl,
        kernel_path=report.kernel_path["name"], dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        device=",".join(model_devices(model)), tokens=len(ids), windows=len(windows), context=opts.context, stride=opts.stride,
        ppl_baseline=ppl_base, ppl_patched=ppl_ours, ppl_rel_diff_pct=abs(ppl_ours - ppl_base) / ppl_base * 100,
        max_abs_logit_diff=max_diff, mean_abs_logit_diff=sum_diff / max(n_diff, 1),
        top1_agreement=agree / max(scored, 1), generate_tokens=opts.generate_tokens,
        generation_identical=not len(differs), first_divergence=int(differs[0]) if len(differs) else None,
        seconds_baseline=seconds["base"], seconds_patched=seconds["patched"],
        patched=report.patched, layers_patched=report.layers_patched, reasons=list(report.reasons),
        fallbacks=dict(fallbacks), kernels=kernels_used(), tolerance_pct=opts.tolerance_pct, min_top1=opts.min_top1,
    )


@contextlib.contextmanager
def _quiet_patch(model):
    """`patched(model)` whose per-call fallback warnings stay unprinted: their counts are in the result."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with patched(model) as report:
            yield report
