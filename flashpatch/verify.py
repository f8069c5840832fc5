"""verify: the same model unpatched and patched on the same text; perplexity, logits, generation, verdict."""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .devices import model_devices, synchronize_all
from .loading import LoadedModel
from .patch import apply, patched, unapply


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
    fallback_calls: dict = field(default_factory=dict)
    tolerance_pct: float = 0.1
    min_top1: float | None = None

    @property
    def passed(self) -> bool:
        top1_ok = self.min_top1 is None or self.top1_agreement >= self.min_top1
        return self.ppl_rel_diff_pct <= self.tolerance_pct and top1_ok

    def to_dict(self) -> dict:
        return {**asdict(self), "verdict": "PASS" if self.passed else "FAIL"}


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


def run_verify(loaded: LoadedModel, text: str, text_source: str, opts: VerifyOptions,
               progress: Callable[[int, int], None] | None = None) -> VerifyResult:
    model = loaded.model
    device = next(model.parameters()).device
    ids = loaded.encode(text)
    if opts.max_tokens:
        ids = ids[: opts.max_tokens]
    if len(ids) < 2:
        raise ValueError("need at least 2 tokens of text")
    ids = torch.tensor(ids, device=device)
    windows = strided_windows(len(ids), opts.context, opts.stride)
    baseline_impl = model.config._attn_implementation
    report = apply(model)
    unapply(model)
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
        with patched(model) as patch_report:
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
    gen_base = _greedy(model, prompt, opts.generate_tokens, pad_id)
    with patched(model) as patch_report:
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
        fallback_calls=dict(fallbacks), tolerance_pct=opts.tolerance_pct, min_top1=opts.min_top1,
    )
