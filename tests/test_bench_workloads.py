"""`flashpatch bench` on the workloads users run: batches of mixed-length, left-padded prompts (--lengths,
--prompts) and `bench train` over mixed-length sequences, padded and packed. Smoke runs on a tiny preset in the
CPU interpreter (speed on a CPU means nothing; the plumbing, the draws and the agreement do)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from flashpatch.bench import generate as bench_generate
from flashpatch.bench import train as bench_train
from flashpatch.bench.generate import FilePrompts, UniformLengths, left_padded, plan_batches
from flashpatch.cli.main import app
from flashpatch.usage import UsageError, length_range
from models import DEVICE, save_model_folder
from test_cli_usage import assert_usage_error, cli

runner = CliRunner()
GEN = ["bench", "tiny-llama", "--new-tokens", "3", "--repeats", "1", "--dtype", "fp32"]
TRAIN = ["bench", "train", "tiny-llama", "--steps", "1", "--dtype", "fp32"]


def test_batched_generation_runs_every_implementation_on_left_padded_batches(tmp_path, monkeypatch):
    """Every implementation generates every batch of the plan, left-padded (mask zeros on the left), with tokens/s
    counted over the real new tokens; the lengths come from the seed; the teacher-forced logits agree in fp32."""
    real, masks = bench_generate._generate_once, []

    def recording(model, prompt, new_tokens, cache_kwargs=None, attention_mask=None):
        masks.append(attention_mask)
        return real(model, prompt, new_tokens, cache_kwargs, attention_mask=attention_mask)

    monkeypatch.setattr(bench_generate, "_generate_once", recording)
    out = tmp_path / "bench.json"
    result = runner.invoke(app, [*GEN, "--batch", "3", "--lengths", "12-40", "--seed", "7", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert not data["partial"] and data["batch"] == 3
    workload = data["workload"]
    assert workload["seed"] == 7 and "[12, 40]" in workload["distribution"]
    expected = plan_batches(UniformLengths(12, 40, 512), batch=3, new_tokens=3, repeats=1, regimes=("cold", "warm"),
                            seed=7, vocab=512)
    assert workload["cold"] == [b.lengths for b in expected.cold] and workload["warm"] == expected.warm.lengths
    rows = data["rows"]
    assert {(r["impl"], r["regime"]) for r in rows} == {
        (i, g) for i in ("eager", "sdpa", "flashpatch") for g in ("cold", "warm")}
    for r in rows:
        assert r["error"] is None and r["e2e_tok_s"] > 0 and r["ttft_ms"] > 0 and r["prefill_tok_s"] > 0, r
        lengths = workload["cold"][0] if r["regime"] == "cold" else workload["warm"]
        assert r["batches"] == [lengths] and r["padded_lengths"] == [max(lengths)]
    assert all(m is not None for m in masks)
    padded = [m for m in masks if not m.all()]
    assert padded and all(m[:, -1].all() for m in padded)  # real tokens end every row: the pads are on the left
    agreement = data["agreement"]
    assert agreement["reference"] == "eager" and agreement["prompt_lengths"] == workload["warm"]
    assert agreement["positions"] == sum(workload["warm"]) + 3 * 3
    for impl in ("sdpa", "flashpatch"):
        stats = agreement["impls"][impl]
        assert stats["top1_agreement"] >= 0.99 and stats["max_abs_logit_diff"] < 1e-3, (impl, stats)
    assert "| regime | impl | tok/s |" in data["markdown"]
    assert "teacher-forced agreement with eager" in result.output


def test_batches_are_drawn_reproducibly_and_cold_ones_stay_unseen():
    def plan(seed, repeats=4):
        return plan_batches(UniformLengths(20, 300, 512), batch=5, new_tokens=4, repeats=repeats,
                            regimes=("cold", "warm"), seed=seed, vocab=512)

    a, b, c = plan(3), plan(3), plan(4)
    assert a.to_dict() == b.to_dict() and a.to_dict() != c.to_dict()
    assert all(torch.equal(x.ids, y.ids) for x, y in zip(a.cold, b.cold))
    for batch in (*a.cold, a.warm):
        assert len(batch.lengths) == 5 and all(20 <= n <= 300 for n in batch.lengths)
    # setup: a 1-token prefill in every power-of-two bucket of padded lengths the range reaches
    assert [1 << (p - 1).bit_length() for p in a.to_dict()["setup_padded_lengths"]] == [32, 64, 128, 256, 512]
    spans = [(9, 17)] + [(p, p) for p in a.to_dict()["setup_padded_lengths"]]
    assert a.cold_unseen == [True] * 4
    for batch in a.cold:
        span = (batch.padded, batch.padded + 4)
        assert not any(span[0] <= hi and span[1] >= lo for lo, hi in spans), (span, spans)
        spans.append(span)
    # a range too narrow for fresh lengths: the batch is still drawn, and marked
    narrow = plan_batches(UniformLengths(8, 20, 512), batch=2, new_tokens=3, repeats=3, regimes=("cold",), seed=0,
                          vocab=512)
    assert len(narrow.cold) == 3 and narrow.cold_unseen[0] and not all(narrow.cold_unseen)


def test_left_padding_and_file_prompts():
    batch = left_padded([[5, 6, 7], [8]])
    assert batch.ids.tolist() == [[5, 6, 7], [0, 0, 8]] and batch.mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    prompts = FilePrompts("f.txt", [[1] * 4, [2] * 9, [3] * 6])
    assert prompts.bounds() == (4, 9)
    drawn = plan_batches(prompts, batch=2, new_tokens=2, repeats=2, regimes=("cold", "warm"), seed=0, vocab=512)
    for b in (*drawn.cold, drawn.warm):
        assert len(set(b.lengths)) == 2 and set(b.lengths) <= {4, 9, 6}  # two different prompts a batch
    more = plan_batches(prompts, batch=5, new_tokens=2, repeats=1, regimes=("warm",), seed=0, vocab=512)
    assert len(more.warm.lengths) == 5  # more than the file holds: drawn with replacement


def test_prompts_file(tmp_path):
    """--prompts from a shell: each batch draws real prompts (a preset tokenizes UTF-8 bytes), left-padded, and the
    kernels run in the interpreter (the file is read before anything imports Triton)."""
    lines = ["The quick brown fox", "jumps", "over the lazy dog, twice over", "", "héllo wörld"]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "bench.json"
    code, stdout, stderr = cli("bench", "tiny-llama", "--prompts", str(path), "--batch", "2", "--new-tokens", "2",
                               "--repeats", "1", "--dtype", "fp32", "--baselines", "sdpa", "--json", str(out),
                               timeout=600)
    assert code == 0, stdout + stderr
    data = json.loads(out.read_text())
    byte_lengths = {len(line.encode("utf-8")) for line in lines if line}
    assert "4 prompts of" in data["workload"]["distribution"]
    for r in data["rows"]:
        assert r["error"] is None and r["e2e_tok_s"] > 0
        assert all(set(lengths) <= byte_lengths for lengths in r["batches"]), (r["batches"], byte_lengths)
    assert data["agreement"]["impls"]["flashpatch"]["top1_agreement"] >= 0.99


def test_a_baseline_transformers_does_not_switch_to_is_unavailable_by_name(monkeypatch):
    """A model whose attention transformers will not switch (GPT-J in 5.17 warns and stays eager) gets no row
    labelled with an implementation it did not run."""
    from flashpatch.bench.switch import each_implementation
    from flashpatch.presets import build_model

    model = build_model("tiny-llama", dtype=torch.float32, device=DEVICE, scale=2)
    real = type(model).set_attn_implementation
    monkeypatch.setattr(type(model), "set_attn_implementation", lambda self, name: real(self, name)
                        if name != "sdpa" else None)
    got = dict(each_implementation(model, ("eager", "sdpa")))
    assert got["eager"] is None and got["flashpatch"] is None
    assert got["sdpa"].startswith("unavailable: transformers keeps this model on")


def test_sdpa_is_no_baseline_for_a_softcapped_model():
    """sdpa drops logit softcapping, so it is not the model's attention: unavailable by name, eager stays."""
    from flashpatch.bench.switch import each_implementation
    from flashpatch.presets import build_model

    model = build_model("tiny-llama", dtype=torch.float32, device=DEVICE, scale=2)
    model.config.attn_logit_softcapping = 30.0
    got = dict(each_implementation(model, ("eager", "sdpa")))
    assert got["eager"] is None and got["sdpa"].startswith("unavailable: sdpa drops this model's logit softcapping")


def test_agreement_sees_a_wrong_kernel(monkeypatch):
    """The teacher-forced check measures the attention: a kernel with the wrong scale shows up in it."""
    from flashpatch import adapter
    from flashpatch.bench.switch import implementation_switcher
    from flashpatch.presets import build_model

    real = adapter.attention_bshd
    monkeypatch.setattr(adapter, "attention_bshd", lambda q, k, v, *, scale=None, **kw: real(
        q, k, v, scale=(scale or q.shape[-1] ** -0.5) * 8.0, **kw))
    model = build_model("tiny-llama", dtype=torch.float32, device=DEVICE, scale=2)
    batch = left_padded([[3, 4, 5, 6, 7, 8, 9, 10], [11, 12, 13]], DEVICE)
    with implementation_switcher(model, ("sdpa",)) as (switch, impls, _):
        result = bench_generate.teacher_forced_agreement(model, switch, impls, batch, new_tokens=2)
    assert result["positions"] == 8 + 3 + 2 * 2
    assert result["impls"]["flashpatch"]["max_abs_logit_diff"] > 1e-3, result


def test_train_padded_and_packed_losses_agree_and_the_table_fits_a_log(tmp_path):
    """bench train in a log: every implementation, both layouts, real tokens/s, losses that agree across the
    implementations and the layouts (the same tokens and labels), an 80-column table and plain progress lines."""
    out = tmp_path / "train.json"
    code, stdout, stderr = cli(*TRAIN, "--tokens", "96", "--lengths", "16-40", "--seed", "3", "--json", str(out),
                               timeout=600)
    assert code == 0, stdout + stderr
    assert "cells: 6/6" in stdout and "Traceback" not in stderr
    lines = stdout.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in stdout
    data = json.loads(out.read_text())
    assert data["sequence_lengths"] == bench_train.draw_lengths(96, 16, 40, 3) and sum(data["sequence_lengths"]) == 96
    rows = data["rows"]
    assert {(r["impl"], r["layout"]) for r in rows} == {
        (i, layout) for i in ("eager", "sdpa", "flashpatch") for layout in ("padded", "packed")}
    n = len(data["sequence_lengths"])
    for r in rows:
        assert r["error"] is None and r["tokens"] == 96 and r["tokens_per_s"] > 0 and r["step_ms"] > 0, r
        assert (r["batch"], r["context"]) == ((n, max(data["sequence_lengths"])) if r["layout"] == "padded"
                                              else (1, 96))
        assert len(r["losses"]) == 2  # the warm-up step and one timed step
    losses = [r["loss"] for r in rows]
    assert max(losses) - min(losses) <= 1e-3 * abs(losses[0]), losses
    for layout in ("padded", "packed"):
        assert all(d <= 1e-3 for d in data["loss_agreement"][layout]["rel_diff"].values())
    assert "loss, relative difference from eager" in stdout


def test_train_oom_cell_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    real = bench_train._step

    def oom_packed_sdpa(model, optimizer, ids, labels=None, **inputs):
        if "position_ids" in inputs and model.config._attn_implementation == "sdpa":
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(model, optimizer, ids, labels=labels, **inputs)

    monkeypatch.setattr(bench_train, "_step", oom_packed_sdpa)
    out = tmp_path / "train.json"
    result = runner.invoke(app, [*TRAIN, "--tokens", "48", "--lengths", "12-24", "--baselines", "sdpa",
                                 "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = {(r["impl"], r["layout"]): r for r in json.loads(out.read_text())["rows"]}
    assert rows[("sdpa", "packed")]["error"] == "OOM" and rows[("sdpa", "packed")]["loss"] is None
    assert all(r["error"] is None and r["tokens_per_s"] > 0 for key, r in rows.items() if key != ("sdpa", "packed"))
    assert "OOM" in result.output


def test_bench_layouts_restores_the_weights():
    from flashpatch.presets import build_model

    model = build_model("tiny-llama", dtype=torch.float32, device=DEVICE, layers=1, scale=2)
    before = [p.detach().clone() for p in model.parameters()]
    sequences = bench_train.random_sequences([10, 7], model.config.vocab_size, 0)
    rows = bench_train.bench_layouts(model, sequences, layouts=("padded",), baselines=(), steps=1)
    assert rows[0].error is None and rows[0].losses[0] != rows[0].losses[1]  # the step changed the weights...
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # ...and they were put back


def test_piped_batched_bench_fits_80_columns():
    code, out, err = cli("bench", "tiny-llama", "--batch", "2", "--lengths", "8-24", "--new-tokens", "2",
                         "--repeats", "1", "--dtype", "fp32", "--baselines", "sdpa", timeout=600)
    assert code == 0, out + err
    assert "cells: 4/4" in out and "cold 1:" in out and "warm:" in out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in out
    assert sum(1 for line in lines if line.split()[:2] in (["cold", "flashpatch"], ["warm", "flashpatch"])) == 2


@pytest.fixture(scope="module")
def bloom(tmp_path_factory):
    return save_model_folder(tmp_path_factory.mktemp("models") / "bloom", "bloom", hidden_size=32, n_head=2, n_layer=1)


@pytest.mark.parametrize("args", [
    ["bench", "{bloom}", "--lengths", "8-16", "--new-tokens", "2", "--repeats", "1", "--dtype", "fp32"],
    ["bench", "train", "{bloom}", "--tokens", "32", "--lengths", "8-16", "--steps", "1", "--dtype", "fp32"],
])
def test_a_model_flashpatch_does_not_serve_exits_3(bloom, args):
    result = runner.invoke(app, [a.replace("{bloom}", bloom) for a in args])
    assert result.exit_code == 3, result.output
    assert "ALiBi" in result.output and "NOT SERVED" in result.output


@pytest.mark.parametrize("args,needles", [
    (["bench", "--lengths", "48-16"], ["--lengths '48-16'", "low end comes first"]),
    (["bench", "--lengths", "abc"], ["--lengths 'abc'", "LO-HI"]),
    (["bench", "--lengths", "0-10"], ["--lengths '0-10'", "at least 1"]),
    (["bench", "--lengths", "16-48", "--contexts", "32"], ["--contexts and --lengths"]),
    (["bench", "--lengths", "16-48", "--prompts", "p.txt"], ["--lengths and --prompts", "give one"]),
    (["bench", "--prompts", "/no/such/prompts.txt"], ["--prompts /no/such/prompts.txt", "cannot read"]),
    (["bench", "--seed", "3"], ["--seed 3", "--lengths or --prompts"]),
    (["bench", "--lengths", "16-48", "--seed", "-1"], ["--seed -1", "at least 0"]),
    (["bench", "--lengths", "16-48", "--plot", "p.png"], ["--plot", "--contexts"]),
    (["bench", "--lengths", "16-48", "--batch", "0"], ["--batch 0"]),
    (["bench", "kernels", "--lengths", "16-48"], ["bench kernels"]),
    (["bench", "train", "--tokens", "1"], ["--tokens 1", "at least 2"]),
    (["bench", "train", "--lengths", "1-8"], ["--lengths '1-8'", "at least 2"]),
    (["bench", "train", "--lengths", "64-16"], ["--lengths '64-16'"]),
    (["bench", "train", "--layouts", "padded,zipped"], ["--layouts", "'zipped'"]),
    (["bench", "train", "--layouts", ","], ["--layouts", "padded, packed or both"]),
    (["bench", "train", "--steps", "0"], ["--steps 0"]),
    (["bench", "train", "--seed", "-2"], ["--seed -2"]),
    (["bench", "train", "--baselines", "sdpa,foo"], ["--baselines", "'foo'"]),
    (["bench", "train", "--json", "/no/such/folder/t.json"], ["--json", "does not exist"]),
    (["bench", "train", "tiny-lama"], ["did you mean 'tiny-llama'"]),
    (["bench", "train", "--device", "tpu"], ["--device 'tpu'"]),
])
def test_bad_new_options_are_one_line_and_exit_2(args, needles):
    assert_usage_error(*cli(*args), *needles)


@pytest.mark.parametrize("content,needle", [(b"caf\xe9\n", "not UTF-8"), (b"\n  \n", "every line is blank")])
def test_bad_prompts_files(tmp_path, content, needle):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    assert_usage_error(*cli("bench", "--prompts", str(path)), needle)


def test_length_range():
    assert length_range("--lengths", "512-4096") == (512, 4096)
    assert length_range("--lengths", " 64 ") == (64, 64)
    for bad in ("", "-5", "1-2-3", "a-b", "9-3"):
        with pytest.raises(UsageError, match="--lengths"):
            length_range("--lengths", bad)


def test_bench_train_options_have_help_and_its_usage_names_it():
    import typer.main

    from flashpatch.cli.main import bench_train_app

    command = typer.main.get_command(bench_train_app)
    for param in command.params:
        assert getattr(param, "help", None), f"flashpatch bench train {param.name} has no help text"
    result = runner.invoke(app, ["bench", "train", "--help"])
    assert result.exit_code == 0 and "bench train" in result.output and "--layouts" in result.output
    assert "--lengths" in runner.invoke(app, ["bench", "--help"]).output


@pytest.mark.parametrize("name,real", [
    ("llama3-8b", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                       num_hidden_layers=32, vocab_size=128256, max_position_embeddings=8192)),
    ("mistral-7b", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                        num_hidden_layers=32, vocab_size=32768, max_position_embeddings=32768, sliding_window=None)),
    ("qwen2.5-7b", dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                        num_hidden_layers=28, vocab_size=152064, max_position_embeddings=131072)),
])
def test_new_presets_build_small_and_are_served(name, real):
    """The presets carry their checkpoints' configs; one block at an eighth of the width (head dim 128 kept)
    builds on a CPU, is served by flashpatch and matches sdpa."""
    from flashpatch.patch import patched
    from flashpatch.presets import build_model, preset

    config = preset(name).config()
    assert {key: getattr(config, key) for key in real} == real
    theta = {"llama3-8b": 500000.0, "mistral-7b": 1e6, "qwen2.5-7b": 1e6}[name]
    assert config.rope_parameters["rope_theta"] == theta
    model = build_model(name, layers=1, scale=8, vocab_size=256, dtype=torch.float32, device=DEVICE)
    assert model.config.num_hidden_layers == 1 and model.config.head_dim == 128
    assert model.config.num_attention_heads == real["num_attention_heads"] // 8
    ids = torch.randint(0, 256, (2, 24), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        with patched(model) as report:
            assert report.patched, report.reasons
            got = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got[mask.bool()], expected[mask.bool()], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("args", [
    ["bench", "tiny-llama", "--lengths", "8-16", "--batch", "2", "--new-tokens", "2", "--repeats", "1",
     "--regimes", "warm"],
    ["bench", "train", "tiny-llama", "--tokens", "24", "--lengths", "8-16", "--steps", "1", "--layouts", "packed"],
])
def test_cells_that_would_fall_back_say_not_served(monkeypatch, tmp_path, args):
    """flashpatch cells whose calls would run the model's own attention are not timed: 'not served', exit 3."""
    from flashpatch import adapter

    monkeypatch.setattr(adapter, "_unsupported_feature", lambda attention_mask, kwargs: "an injected reason")
    out = tmp_path / "out.json"
    result = runner.invoke(app, [*args, "--dtype", "fp32", "--baselines", "sdpa", "--json", str(out)])
    assert result.exit_code == 3, result.output
    data = json.loads(out.read_text())
    ours = [r for r in data["rows"] if r["impl"] == "flashpatch"]
    assert ours and all(r["error"].startswith("not served: an injected reason") for r in ours), ours
    assert all(r["error"] is None for r in data["rows"] if r["impl"] == "sdpa")
    if "agreement" in data:
        assert data["agreement"]["impls"]["flashpatch"]["error"].startswith("not served")
