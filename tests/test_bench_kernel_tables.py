"""`flashpatch bench kernels`' driver: each table is handed over as soon as it is measured, the JSON marked partial
until the last, so a run cut short keeps what it measured."""

import torch

from flashpatch.bench import kernels


class FakeRow:
    def __init__(self, name):
        self.name = name

    def to_dict(self):
        return {"name": self.name}


def fake_measurements(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(kernels, "bench_forward", lambda impls, **kw: [FakeRow("fwd")])
    monkeypatch.setattr(kernels, "bench_backward",
                        lambda backward_only=False, **kw: [FakeRow("bwd" if backward_only else "train")])
    monkeypatch.setattr(kernels, "bench_decode",
                        lambda impls, cuda_graph=False, **kw: [FakeRow("graph" if cuda_graph else "decode")])
    monkeypatch.setattr(kernels, "markdown_table", lambda rows, impls: f"table of {rows[0].name}")
    monkeypatch.setattr(kernels, "decode_markdown", lambda rows, impls: f"table of {rows[0].name}")


def test_each_table_is_handed_over_when_done(monkeypatch):
    fake_measurements(monkeypatch)
    seen = []
    tables, data = kernels.run_kernel_tables([512], (64,), on_table=lambda title, text, so_far: seen.append(
        (text, so_far["partial"], sorted(k for k in so_far if k not in ("partial", "kernels_used")))))
    assert [text for text, _, _ in seen] == ["table of fwd", "table of train", "table of bwd", "table of decode",
                                             "table of graph"]
    assert [partial for _, partial, _ in seen] == [True, True, True, True, False]
    assert seen[0][2] == ["rows"] and len(seen[-1][2]) == 5
    assert [text for _, text in tables] == [text for text, _, _ in seen]
    assert data["partial"] is False and data["backward_rows"] == [{"name": "bwd"}]
    assert isinstance(data["kernels_used"], list)  # what served flashpatch's cells (none here: faked)


def test_only_the_tables_asked_for_are_measured(monkeypatch):
    fake_measurements(monkeypatch)
    totals = []
    tables, data = kernels.run_kernel_tables([512], (64,), tables=("fwd-bwd", "decode"),
                                             progress=lambda *args: totals.append(args))
    assert [text for _, text in tables] == ["table of train", "table of decode", "table of graph"]
    assert sorted(k for k in data if k not in ("partial", "kernels_used")) == ["decode_graph_rows", "decode_rows",
                                                                             "forward_backward_rows"]
    assert data["partial"] is False
    everything = []
    kernels.run_kernel_tables([512], (64,), progress=lambda *args: everything.append(args))
    assert 0 < totals[0][1] < everything[0][1]


def test_decode_table_has_a_row_per_kv_heads_batch_and_cache():
    """MHA rows first, then GQA; the ratio is the baseline's time over flashpatch's; a failed cell says why."""
    rows = [kernels.DecodeRow("flashpatch", 1, 4096, 10.0, 2.0, None, 8),
            kernels.DecodeRow("sdpa-cudnn", 1, 4096, 30.0, 0.7, None, 8),
            kernels.DecodeRow("flashpatch", 1, 4096, 20.0, 1.5, None, 32),
            kernels.DecodeRow("sdpa-cudnn", 1, 4096, None, None, "OOM", 32)]
    lines = kernels.decode_markdown(rows, ["flashpatch", "sdpa-cudnn"]).splitlines()
    assert lines[0].startswith("| KV heads | batch | cache |")
    assert lines[2] == "| 32 | 1 | 4096 | 1.50 | OOM | - | 20.0 |"
    assert lines[3] == "| 8 | 1 | 4096 | 2.00 | 0.70 | 3.00x | 10.0 |"
