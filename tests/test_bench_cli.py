"""`flashpatch bench` smoke runs on a tiny preset (speed on a CPU means nothing; the plumbing does)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from flashpatch.bench import generate as bench_generate
from flashpatch.bench.generate import _LengthSource
from flashpatch.cli.main import app

runner = CliRunner()
ARGS = ["bench", "tiny-llama", "--contexts", "24,40", "--new-tokens", "4", "--repeats", "1", "--dtype", "fp32"]


def test_smoke_json_and_plot(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    result = runner.invoke(app, [*ARGS, "--json", str(out), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {(r["impl"], r["context"], r["regime"]) for r in rows} == {
        (i, c, g) for i in ("eager", "sdpa", "flashpatch") for c in (24, 40) for g in ("cold", "warm")}
    for r in rows:
        assert r["error"] is None and r["e2e_tok_s"] > 0 and r["ttft_ms"] > 0
    cold = [r["prompt_lengths"] for r in rows if r["regime"] == "cold" and r["impl"] == "flashpatch"]
    assert cold == [[24], [40]]
    assert "x sdpa" in data["markdown"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_rows_are_saved_after_every_context(tmp_path, monkeypatch):
    """A long run that is cut off keeps the contexts it finished: the JSON is rewritten after each, marked
    partial until the end."""
    real, snapshots = bench_generate._generate_once, []
    out = tmp_path / "bench.json"

    def snapshotting(model, prompt, new_tokens, cache_kwargs=None):
        if out.exists():
            snapshots.append(json.loads(out.read_text()))
        return real(model, prompt, new_tokens, cache_kwargs)

    monkeypatch.setattr(bench_generate, "_generate_once", snapshotting)
    result = runner.invoke(app, [*ARGS, "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert snapshots and all(s["partial"] for s in snapshots)
    assert {r["context"] for r in snapshots[0]["rows"]} == {24} and len(snapshots[0]["rows"]) == 6
    final = json.loads(out.read_text())
    assert not final["partial"] and len(final["rows"]) == 12


def test_a_failing_cell_is_recorded_and_the_run_completes(tmp_path, monkeypatch):
    real = bench_generate._generate_once

    def oom_on_long_prompts(model, prompt, new_tokens, cache_kwargs=None):
        if prompt.shape[1] >= 40 and model.config._attn_implementation == "eager":
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(model, prompt, new_tokens, cache_kwargs)

    monkeypatch.setattr(bench_generate, "_generate_once", oom_on_long_prompts)
    out = tmp_path / "bench.json"
    result = runner.invoke(app, [*ARGS, "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    failed = [r for r in rows if r["error"]]
    assert {(r["impl"], r["context"]) for r in failed} == {("eager", 40)}
    assert all(r["error"] == "OOM" for r in failed)
    assert all(r["e2e_tok_s"] for r in rows if not r["error"])


def test_setup_tunes_each_bucket_and_cold_cells_stay_unseen(tmp_path, monkeypatch):
    """The per-context warm-up generates once in the context's power-of-two length bucket (what flashpatch's
    autotuner keys on), with the run's decode steps (the decode kernels' first compiles), and still no cold cell
    meets a KV length its implementation has seen."""
    real, calls = bench_generate._generate_once, []

    def recording(model, prompt, new_tokens, cache_kwargs=None):
        calls.append((model.config._attn_implementation, prompt.shape[1], new_tokens))
        return real(model, prompt, new_tokens, cache_kwargs)

    monkeypatch.setattr(bench_generate, "_generate_once", recording)
    out = tmp_path / "bench.json"
    contexts = (24, 40, 100)
    result = runner.invoke(app, [*ARGS[:3], ",".join(map(str, contexts)), *ARGS[4:], "--repeats", "2",
                                 "--regimes", "cold", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert all(r["setup_s"] > 0 for r in rows)
    for impl in {c[0] for c in calls}:
        mine = [c[1:] for c in calls if c[0] == impl]
        for context in contexts:
            bucket = 1 << (context - 1).bit_length()
            assert any(bucket // 2 < length <= bucket and tokens == 4 for length, tokens in mine), (impl, context)
    cells = [(r["impl"], length) for r in rows for length in r["prompt_lengths"]]
    assert len(cells) == 2 * len(contexts) * 3
    for impl, length in cells:
        impl_name = "fp_triton" if impl == "flashpatch" else impl
        mine = [c[1:] for c in calls if c[0] == impl_name]
        first = mine.index((length, 4))
        for earlier_length, tokens in mine[:first]:
            assert earlier_length + tokens - 1 < length or earlier_length > length + 3, (impl, length, mine)


def test_implementations_alternate_repeat_by_repeat(tmp_path, monkeypatch):
    """Dynamic cache: within a context and regime, each repeat runs every implementation in turn (a drifting host
    moves them alike), the order rotating so that none always follows the same one; the rows still come out
    grouped by implementation, each with its repeats' own rates."""
    real, real_warmup, order, warming = bench_generate._generate_once, bench_generate._context_warmup, [], []

    def recording(model, prompt, new_tokens, cache_kwargs=None):
        if new_tokens == 4 and not warming:  # the cells' calls (first-use calls generate 8 tokens)
            order.append(model.config._attn_implementation)
        return real(model, prompt, new_tokens, cache_kwargs)

    def warmup(*args):
        warming.append(True)
        try:
            return real_warmup(*args)
        finally:
            warming.pop()

    monkeypatch.setattr(bench_generate, "_generate_once", recording)
    monkeypatch.setattr(bench_generate, "_context_warmup", warmup)
    out = tmp_path / "bench.json"
    result = runner.invoke(app, [*ARGS[:3], "24", *ARGS[4:], "--repeats", "4", "--json", str(out)])
    assert result.exit_code == 0, result.output
    a, b, c = "eager", "sdpa", "fp_triton"
    repeats = [a, b, c, b, c, a, c, a, b, a, b, c]
    assert order == repeats + [a, b, c] + repeats  # cold: 4 repeats; warm: an untimed call each, then 4 repeats
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["eager"] * 2 + ["sdpa"] * 2 + ["flashpatch"] * 2
    for r in rows:
        runs = sorted(r["e2e_runs_tok_s"])
        assert len(runs) == 4 and runs[0] > 0 and runs[1] <= r["e2e_tok_s"] <= runs[2]


def test_speedups_are_medians_of_per_repeat_ratios():
    """A host whose speed drifts moves a repeat's runs together: the speedup pairs runs of one repeat, and falls back
    to the ratio of medians where repeats don't pair (a failed run)."""
    import random

    from flashpatch.bench.generate import GenRow, speedup_table

    drift = [random.uniform(0.5, 2.0) for _ in range(5)]
    edge = [random.uniform(1.02, 1.2) for _ in range(5)]
    ours = GenRow("flashpatch", 512, "warm", [], e2e_tok_s=1.0, e2e_runs_tok_s=[d * e for d, e in zip(drift, edge)])
    base = GenRow("sdpa", 512, "warm", [], e2e_tok_s=1.0, e2e_runs_tok_s=drift)
    ours.e2e_tok_s, base.e2e_tok_s = sorted(ours.e2e_runs_tok_s)[2], sorted(drift)[2]
    short = GenRow("eager", 512, "warm", [], e2e_tok_s=2.0, e2e_runs_tok_s=drift[:4])
    (rec,) = speedup_table([ours, base, short], ("eager", "sdpa"))
    assert rec["x_sdpa"] == pytest.approx(sorted(edge)[2])
    assert rec["x_eager"] == pytest.approx(ours.e2e_tok_s / 2.0)


def test_cold_lengths_never_overlap():
    """Every cold run's KV lengths are new, however many repeats a short context gets: below the context down to
    half of it, then above it."""
    source = _LengthSource(new_tokens=16)
    source.mark(100, span=1)  # a warm-up's length
    spans = []
    for context in (512, 512, 512, 1024, 600, *[150] * 8):
        start = source.fresh(context)
        assert start >= context // 2
        spans.append((start, start + 16))
    for i, (a0, a1) in enumerate(spans):
        for b0, b1 in spans[i + 1:]:
            assert a1 < b0 or b1 < a0, spans
    assert not any(a0 <= 100 <= a1 for a0, a1 in spans)


def test_kernels_bench_needs_a_gpu():
    if torch.cuda.is_available():
        return
    result = runner.invoke(app, ["bench", "kernels"])
    assert result.exit_code == 2 and "CUDA" in result.output


def test_static_cache_run(tmp_path):
    """--cache static: every cell generates with a StaticCache sized context + new tokens, compile time reported."""
    out = tmp_path / "bench.json"
    result = runner.invoke(app, [*ARGS, "--cache", "static", "--regimes", "cold", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["cache"] == "static"
    for r in data["rows"]:
        assert r["error"] is None and r["cache"] == "static" and r["setup_s"] > 0
    assert "setup s" in data["markdown"]


def test_device_map_auto_run(tmp_path, monkeypatch):
    """--device-map auto builds the preset on the CPU and hands it to accelerate's dispatch (every GPU there is)."""
    import flashpatch.devices

    dispatched = []
    real = flashpatch.devices.dispatch_auto
    monkeypatch.setattr(flashpatch.devices, "dispatch_auto", lambda model: dispatched.append(1) or real(model))
    out = tmp_path / "bench.json"
    result = runner.invoke(app, [*ARGS, "--regimes", "warm", "--baselines", "sdpa", "--device-map", "auto",
                                 "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert dispatched == [1]
    assert all(r["error"] is None for r in json.loads(out.read_text())["rows"])


def test_a_cell_without_a_measurement_shows_a_word_and_its_reason_goes_under_the_table():
    """A baseline transformers refuses, or an OOM: the tok/s cell says 'unavailable' / the exception's name, and
    the whole reason is one line below the table, so the table keeps its 80 columns."""
    from flashpatch.bench.generate import GenRow, terminal_table
    from flashpatch.bench.switch import cell_word, error_notes

    reason = "unavailable: sdpa drops this model's logit softcapping (compare with eager)"
    rows = [GenRow("sdpa", 2048, "warm", [], error=reason), GenRow("sdpa", 4096, "warm", [], error=reason),
            GenRow("eager", 4096, "warm", [], error="OOM")]
    rows += [GenRow("flashpatch", n, "warm", [n], 10.0, 100.0, 90.0, 1.0, e2e_runs_tok_s=[90.0]) for n in (2048, 4096)]
    assert cell_word(reason) == "unavailable" and cell_word("OOM") == "OOM" and cell_word(None) == "-"
    assert error_notes(rows) == [f"sdpa: {reason}"]
    header, cells = terminal_table(rows, ["eager", "sdpa"])
    speeds = {(c[0], c[2]): c[header.index("tok/s")] for c in cells}
    assert speeds[("2048", "sdpa")] == "unavailable" and speeds[("4096", "eager")] == "OOM"
