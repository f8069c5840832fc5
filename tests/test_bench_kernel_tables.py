"""`flashpatch bench kernels`' driver: each table is handed over as soon as it is measured, the JSON marked partial
until the last, so a run cut short keeps what it measured."""

import torch

from flashpatch.bench import kernels


class FakeRow:
    def __init__(self, name):
        self.name = name

    def to_dict(self):
        return {"name": self.name}


def test_each_table_is_handed_over_when_done(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(kernels, "bench_forward", lambda impls, **kw: [FakeRow("fwd")])
    monkeypatch.setattr(kernels, "bench_backward",
                        lambda backward_only=False, **kw: [FakeRow("bwd" if backward_only else "train")])
    monkeypatch.setattr(kernels, "bench_decode",
                        lambda impls, cuda_graph=False, **kw: [FakeRow("graph" if cuda_graph else "decode")])
    monkeypatch.setattr(kernels, "markdown_table", lambda rows, impls: f"table of {rows[0].name}")
    monkeypatch.setattr(kernels, "decode_markdown", lambda rows, impls: f"table of {rows[0].name}")
    seen = []
    tables, data = kernels.run_kernel_tables([512], (64,), on_table=lambda title, text, so_far: seen.append(
        (text, so_far["partial"], sorted(k for k in so_far if k != "partial"))))
    assert [text for text, _, _ in seen] == ["table of fwd", "table of train", "table of bwd", "table of decode",
                                             "table of graph"]
    assert [partial for _, partial, _ in seen] == [True, True, True, True, False]
    assert seen[0][2] == ["rows"] and len(seen[-1][2]) == 5
    assert [text for _, text in tables] == [text for text, _, _ in seen]
    assert data["partial"] is False and data["backward_rows"] == [{"name": "bwd"}]
