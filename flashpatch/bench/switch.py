"""Putting one model on each implementation in turn, for benchmarks that compare them call by call; a failed
cell's one line, and whether a flashpatch cell was not served."""

from __future__ import annotations

import contextlib

import torch

from ..patch import apply, unapply


@contextlib.contextmanager
def implementation_switcher(model, baselines):
    """For benchmarks that alternate implementations call by call: yields (switch, names, unavailable), where
    switch(name) puts the model on a baseline or on flashpatch (fallback="error"), names are the usable ones
    (baselines first, flashpatch last) and unavailable maps refused baselines to why. The model's own attention is
    restored at the end, and a flashpatch run that fell back anyway fails loudly."""
    original = model.config._attn_implementation
    names, unavailable, reports = [], {}, []
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in baselines:
        if name == "sdpa" and getattr(text_config, "attn_logit_softcapping", None):
            # transformers 5.17 loads Gemma 2 with sdpa, whose entry drops the cap: a different attention
            unavailable[name] = "unavailable: sdpa drops this model's logit softcapping (compare with eager)"
            continue
        try:
            model.set_attn_implementation(name)
        except (ValueError, ImportError) as exc:
            unavailable[name] = f"unavailable: {exc}".splitlines()[0][:160]
            continue
        if model.config._attn_implementation != name:  # transformers warned and kept the model as it was (GPT-J)
            unavailable[name] = (f"unavailable: transformers keeps this model on "
                                 f"{model.config._attn_implementation!r} (no switching its attention)")
        else:
            names.append(name)
    model.set_attn_implementation(original)

    def switch(name):
        unapply(model)
        if name == "flashpatch":
            reports.append(apply(model, fallback="error"))
        else:
            model.set_attn_implementation(name)

    try:
        yield switch, [*names, "flashpatch"], unavailable
        fell_back = {k: v for report in reports for k, v in report.fallbacks.items()}
        assert not fell_back, f"flashpatch fell back during the benchmark: {fell_back}"
    finally:
        unapply(model)
        model.set_attn_implementation(original)


def each_implementation(model, baselines):
    """For benchmarks: yield (name, None) with the model switched to each baseline in turn, then
    ("flashpatch", None) with it patched (fallback="error"); a baseline transformers refuses is yielded as
    (name, reason) and skipped. Restores and checks as `implementation_switcher` does."""
    with implementation_switcher(model, baselines) as (switch, _, unavailable):
        for name in (*baselines, "flashpatch"):
            if name in unavailable:
                yield name, unavailable[name]
                continue
            switch(name)
            yield name, None


def failure_line(exc: Exception) -> str:
    """A failed cell's one line: OOM, a flashpatch call that would have run the original attention (the cell is
    not timed then), or the exception."""
    from ..adapter import FallbackError

    if isinstance(exc, torch.OutOfMemoryError):
        return "OOM"
    if isinstance(exc, FallbackError):
        return f"not served: {str(exc).split(': ', 1)[-1]}"[:160]
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:160]


def cell_word(error: str | None) -> str:
    """What a table cell shows for a row without a measurement: its error's first words ("unavailable", "OOM",
    "not served", an exception's name); the whole line goes under the table (`error_notes`), so columns stay narrow."""
    return error.split(":", 1)[0] if error else "-"


def error_notes(rows) -> list[str]:
    """'impl: error' once per distinct error whose cell shows less than the whole line."""
    notes = [f"{r.impl}: {r.error}" for r in rows if r.error and cell_word(r.error) != r.error]
    return list(dict.fromkeys(notes))


def any_not_served(rows) -> bool:
    """Whether a flashpatch row failed as not served: it would have run the model's own attention."""
    return any(r.impl == "flashpatch" and (r.error or "").startswith("not served") for r in rows)
