"""The training benchmark's plumbing on a tiny preset (speed on a CPU means nothing)."""

import torch

from flashpatch.bench import train as bench_train
from flashpatch.bench.train import bench_training, markdown
from flashpatch.presets import build_model
from models import DEVICE


def test_rows_for_every_implementation_and_shape():
    model = build_model("tiny-llama", dtype=torch.float32, attn_implementation="sdpa", device=DEVICE)
    rows = bench_training(model, [(2, 24), (1, 40)], steps=1)
    assert {(r.impl, r.batch, r.context) for r in rows} == {
        (i, b, c) for i in ("eager", "sdpa", "flashpatch") for b, c in ((2, 24), (1, 40))}
    assert all(r.error is None and r.samples_per_s > 0 for r in rows), [r.error for r in rows]
    assert model.config._attn_implementation == "sdpa"  # restored
    assert "x sdpa" in markdown(rows)


def test_an_oom_shape_is_recorded_and_the_run_goes_on(monkeypatch):
    real = bench_train._step

    def oom_on_long(model, optimizer, ids):
        if ids.shape[1] >= 40:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(model, optimizer, ids)

    monkeypatch.setattr(bench_train, "_step", oom_on_long)
    model = build_model("tiny-llama", dtype=torch.float32, attn_implementation="sdpa", device=DEVICE)
    rows = bench_training(model, [(2, 24), (1, 40)], baselines=("sdpa",), steps=1)
    assert [r.error for r in rows if r.context == 40] == ["OOM", "OOM"]
    assert all(r.samples_per_s for r in rows if r.context == 24)
    assert "OOM" in markdown(rows, baselines=("sdpa",))
