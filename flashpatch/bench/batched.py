"""Batched generation over mixed-length prompts, as `flashpatch bench --lengths | --prompts` runs it: the checked
choice of prompts, the run's batches drawn for the loaded model, and the lines that describe the batches and the
teacher-forced agreement. The timing itself is `generate.bench_batched_generation`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..usage import UsageError, at_least, length_range, text_lines

if TYPE_CHECKING:
    from .generate import BatchPlan, FilePrompts, UniformLengths

# .generate and ..loading are imported where they are used: the CLI checks the prompts before it chooses the
# device, and on a CPU TRITON_INTERPRET must be set before anything imports Triton's language.


@dataclass
class PromptWorkload:
    """What a batched run's prompts are drawn from: lengths uniform over [low, high] with random tokens, or a text
    file's lines; and the seed of the draws."""

    seed: int
    lengths: tuple[int, int] | None = None
    prompts: str | None = None  # the text file
    lines: list[str] | None = None  # its non-blank lines

    def longest(self) -> int:
        """An upper bound of a prompt's tokens, known before the model is loaded."""
        if self.lengths is not None:
            return self.lengths[1]
        # a preset's tokenizer is its UTF-8 byte codec; other models' prompts are checked once tokenized
        return max(len(line.encode("utf-8")) for line in self.lines)

    def source(self, loaded) -> UniformLengths | FilePrompts:
        """What `plan_batches` draws from, for the loaded model's vocabulary and tokenizer."""
        from .generate import FilePrompts, UniformLengths

        if self.lengths is not None:
            return UniformLengths(*self.lengths, loaded.model.config.vocab_size)
        source = FilePrompts(self.prompts, [loaded.encode(line) for line in self.lines])
        if not source.prompts:
            raise UsageError(f"--prompts {self.prompts}: every prompt tokenizes to nothing")
        return source


def batched_workload(contexts, lengths, prompts, seed, plot_path) -> PromptWorkload:
    """The checked choice of batched prompts from `flashpatch bench`'s options: --lengths or --prompts, neither
    with --contexts nor with --plot."""
    if lengths is not None and prompts is not None:
        raise UsageError("--lengths and --prompts each choose the prompts: give one of them")
    flag = "--lengths" if lengths is not None else "--prompts"
    if contexts is not None:
        raise UsageError(f"--contexts and {flag}: --contexts runs prompts of one length each, {flag} batches of "
                         "mixed lengths; give one of them")
    if plot_path:
        raise UsageError(f"--plot draws tokens/s by context: use it with --contexts, not {flag}")
    at_least("--seed", seed, 0)
    seed = 0 if seed is None else seed
    if lengths is not None:
        return PromptWorkload(seed, lengths=length_range("--lengths", lengths))
    return PromptWorkload(seed, prompts=prompts, lines=text_lines("--prompts", prompts))


def batch_plan(spec: str, loaded, workload: PromptWorkload, *, batch: int, new_tokens: int, repeats: int,
               regimes) -> BatchPlan:
    """Every batch of the run, drawn for the loaded model. A model's own positions must hold the longest prompt
    plus the new tokens (a preset is built long enough)."""
    from ..loading import PRESET_CONFIGS
    from .generate import plan_batches

    model = loaded.model
    source = workload.source(loaded)
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if spec not in PRESET_CONFIGS and limit and source.bounds()[1] + new_tokens > limit:
        raise UsageError(f"the longest prompt ({source.bounds()[1]} tokens) plus --new-tokens {new_tokens} passes "
                         f"the model's {limit} positions; shorten the prompts or lower --new-tokens")
    return plan_batches(source, batch=batch, new_tokens=new_tokens, repeats=repeats, regimes=regimes,
                        seed=workload.seed, vocab=model.config.vocab_size, device=next(model.parameters()).device)


def plan_lines(plan: BatchPlan) -> list[str]:
    """The run's prompts and each batch's lengths, said before the timing starts."""
    lines = [f"prompts: {plan.workload}; seed {plan.seed}; batches of {plan.batch}, left-padded"]
    for i, (b, unseen) in enumerate(zip(plan.cold, plan.cold_unseen), 1):
        seen = "" if unseen else "; no unseen length was left"
        lines.append(f"  cold {i}: {' '.join(map(str, b.lengths))} (padded to {b.padded}{seen})")
    if plan.warm is not None:
        lines.append(f"  warm: {' '.join(map(str, plan.warm.lengths))} (padded to {plan.warm.padded})")
    return lines


def _compared(agreement: dict) -> bool:
    return agreement.get("reference") is not None and "error" not in agreement


def agreement_summary(agreement: dict, plan: BatchPlan) -> str:
    """The line above the agreement table: what went through each forward, or why nothing was compared."""
    if not _compared(agreement):
        return f"teacher-forced agreement: {agreement.get('error') or agreement.get('reason', '-')}"
    which, ref = "warm" if plan.warm is not None else "last cold", agreement["reference"]
    return (f"teacher-forced agreement with {ref}: the {which} batch's prompts + {ref}'s {agreement['new_tokens']} "
            f"greedy tokens through each forward, logits at {agreement['positions']} real positions")


def agreement_table(agreement: dict) -> tuple[list[str], list[list[str]]] | None:
    """Per implementation compared with the reference: the largest |logit difference| and the top-1 agreement
    (or its error); None when nothing was compared."""
    if not _compared(agreement):
        return None
    body = []
    for impl, stats in agreement["impls"].items():
        if "error" in stats:
            body.append([impl, stats["error"], "-"])
        else:
            body.append([impl, f"{stats['max_abs_logit_diff']:.3g}", f"{stats['top1_agreement']:.4%}"])
    return ["impl", "max |logit diff|", "top-1 agreement"], body
