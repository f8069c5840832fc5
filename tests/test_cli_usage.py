"""What a user meets at the command line: bad input gets one line and exit 2 before any long work, a model
flashpatch does not serve gets NOT SERVED and exit 3 (never PASS), and output fits a log.

Where the exit code and the absence of a traceback matter, the CLI runs in a subprocess, as a user's shell runs it.
"""

import json
import os
import re
import subprocess
import sys
import warnings

import pytest
from typer.testing import CliRunner

from conftest import WIKITEXT
from flashpatch.cli.main import app
from models import save_model_folder

runner = CliRunner()
QUICK = ["--max-tokens", "96", "--context", "32", "--generate-tokens", "3", "--dtype", "fp32"]


def cli(*args, timeout=300):
    """`flashpatch ARGS` in a new process, as from a shell: (exit code, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "flashpatch.cli.main", *args], capture_output=True, text=True,
                         timeout=timeout, env=env)
    return res.returncode, res.stdout, res.stderr


def assert_usage_error(code, out, err, *needles):
    text = out + err
    assert code == 2, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert "error:" in text
    for needle in needles:
        assert needle in " ".join(text.split()), text[-3000:]  # rich may wrap the line


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Local model folders flashpatch refuses, each for a different reason, and one it serves."""
    root = tmp_path_factory.mktemp("models")
    return {
        "bloom": save_model_folder(root / "bloom", "bloom", hidden_size=32, n_head=2, n_layer=1),
        "falcon": save_model_folder(root / "falcon", "falcon", hidden_size=32, num_attention_heads=2,
                                    num_hidden_layers=1, alibi=True),
        "llama12": save_model_folder(root / "llama12", "llama", hidden_size=24, intermediate_size=32,
                                     num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1, head_dim=12),
        "llama": save_model_folder(root / "llama", "llama", hidden_size=64, intermediate_size=32,
                                   num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3),
    }


@pytest.mark.parametrize("args,needles", [
    (["verify", "gpt2", "--device", "tpu"], ["--device 'tpu'"]),
    (["bench", "--contexts", "-5"], ["--contexts", "at least 1"]),
    (["bench", "--contexts", "12,x"], ["--contexts", "comma-separated integers"]),
    (["verify", "gpt2", "--text", WIKITEXT, "--max-tokens", "0"], ["--max-tokens 0"]),
    (["verify", "gpt2", "--text", WIKITEXT, "--context", "0"], ["--context 0"]),
    (["verify", "gpt2", "--text", WIKITEXT, "--context", "-5"], ["--context -5"]),
    (["verify", "gpt2", "--text", WIKITEXT, "--min-top1", "1.5"], ["--min-top1 1.5"]),
    (["verify", "gpt2", "--text", WIKITEXT, "--json", "/no/such/folder/out.json"], ["--json", "does not exist"]),
    (["bench", "--plot", "/no/such/folder/out.png"], ["--plot", "does not exist"]),
    (["bench", "--json", "/no/such/folder/out.json"], ["--json", "does not exist"]),
    (["bench", "--baselines", "sdpa,foo", "--contexts", "16"], ["--baselines", "'foo'"]),
    (["bench", "--repeats", "0"], ["--repeats 0"]),
    (["bench", "kernels", "--head-dims", "12"], ["--head-dims"]),
    (["bench", "kernels", "--tables", "forward,decodes"], ["--tables", "fwd-bwd"]),
    (["bench", "--tables", "forward"], ["--tables", "bench kernels"]),
    (["verify", "tiny-lama", "--text", WIKITEXT], ["'tiny-lama'", "did you mean 'tiny-llama'"]),
])
def test_bad_input_is_one_line_and_exit_2(args, needles):
    assert_usage_error(*cli(*args), *needles)


def test_a_misspelt_preset_fails_at_once_without_the_hub():
    import time

    start = time.monotonic()
    assert_usage_error(*cli("bench", "gpt-2"), "did you mean 'gpt2'")
    assert time.monotonic() - start < 30  # the hub's retries took ~50 s


def test_text_that_is_not_utf8(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    assert_usage_error(*cli("verify", "gpt2", "--text", str(bad)), "not UTF-8", "iconv")


def test_text_of_one_token(tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("a")
    assert_usage_error(*cli("verify", "gpt2", "--text", str(one), *QUICK), "1 token", "at least 2")


def test_a_refused_model_is_not_served_exit_3_in_json(folders):
    """A BLOOM (ALiBi): flashpatch leaves it as it is, so verify says so, writes no parity numbers, and prints no
    Python warning."""
    code, out, err = cli("verify", folders["bloom"], "--text", WIKITEXT, *QUICK, "--json", "-")
    assert code == 3, out + err
    data = json.loads(out)
    assert data["verdict"] == "NOT SERVED" and data["patched"] is False and data["fallbacks"] == {}
    assert any("ALiBi" in reason for reason in data["reasons"])
    assert "UserWarning" not in err and "Traceback" not in err and "NOT SERVED" in err


@pytest.mark.parametrize("name,reason", [("falcon", "ALiBi"), ("llama12", "head_dim 12")])
def test_refused_models_name_their_reason(folders, name, reason, tmp_path):
    out = tmp_path / "verify.json"
    result = runner.invoke(app, ["verify", folders[name], "--text", WIKITEXT, *QUICK, "--json", str(out)])
    assert result.exit_code == 3, result.output
    assert "PASS" not in result.output and "NOT SERVED" in result.output
    data = json.loads(out.read_text())
    assert not data["patched"] and any(reason in r for r in data["reasons"]), data["reasons"]


def test_bench_refuses_to_time_a_model_it_does_not_serve(folders):
    result = runner.invoke(app, ["bench", folders["bloom"], "--contexts", "16", "--new-tokens", "2",
                                 "--repeats", "1", "--dtype", "fp32"])
    assert result.exit_code == 3, result.output
    assert "ALiBi" in result.output and "NOT SERVED" in result.output


def test_calls_that_fell_back_make_the_verdict_not_served(monkeypatch):
    """Some attention calls ran the model's own attention: the numbers then compare that with itself, so the
    verdict is NOT SERVED (exit 3), with the counts and the reason."""
    from flashpatch import adapter

    real = adapter._unsupported_feature
    calls = []

    def every_other(attention_mask, kwargs):
        calls.append(1)
        return "an injected reason" if len(calls) % 2 else real(attention_mask, kwargs)

    monkeypatch.setattr(adapter, "_unsupported_feature", every_other)
    result = runner.invoke(app, ["verify", "gpt2", "--layers", "2", "--text", WIKITEXT, *QUICK, "--json", "-"])
    assert result.exit_code == 3, result.output
    data = json.loads(result.output[result.output.index("{"):])
    assert data["verdict"] == "NOT SERVED" and data["patched"] is True
    assert data["fallbacks"]["an injected reason"] > 0 and data["layers_patched"] == 2


def test_a_fail_says_which_criterion_failed(monkeypatch):
    from flashpatch import adapter

    real = adapter.attention_bshd
    monkeypatch.setattr(adapter, "attention_bshd", lambda q, k, v, *, scale=None, **kw: real(
        q, k, v, scale=(scale or q.shape[-1] ** -0.5) * 3.0, **kw))
    result = runner.invoke(app, ["verify", "gpt2", "--layers", "2", "--text", WIKITEXT, *QUICK, "--min-top1", "0.999",
                                 "--json", "-"])
    assert result.exit_code == 1, result.output
    data = json.loads(result.output[result.output.index("{"):])
    assert data["verdict"] == "FAIL"
    assert any("perplexity differs" in f and "--tolerance" in f for f in data["failures"]), data["failures"]


def test_min_top1_is_shown_as_given(folders):
    result = runner.invoke(app, ["verify", folders["llama"], "--text", WIKITEXT, *QUICK, "--min-top1", "0.999"])
    assert result.exit_code == 0, result.output
    assert "required 99.9000%" in result.output


def test_layers_keeps_the_first_blocks_of_a_local_folder(folders, tmp_path):
    out = tmp_path / "verify.json"
    result = runner.invoke(app, ["verify", folders["llama"], "--layers", "1", "--text", WIKITEXT, *QUICK,
                                 "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["layers_patched"] == 1 and "first 1 layers" in data["model"]


def test_optional_dependencies_are_named_before_the_run(monkeypatch, tmp_path):
    import importlib.util

    from flashpatch import usage

    real = importlib.util.find_spec
    monkeypatch.setattr(usage.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("matplotlib", "gguf") else real(name, *a))
    result = runner.invoke(app, ["bench", "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 2 and "flashpatch[plot]" in result.output, result.output
    result = runner.invoke(app, ["verify", "smollm2", "--text", WIKITEXT])
    assert result.exit_code == 2 and "flashpatch[gguf]" in result.output, result.output


def test_piped_output_has_progress_lines_and_an_80_column_table():
    """Without a terminal (a log, CI): plain progress lines, and a bench table whose every cell survives 80 columns."""
    code, out, err = cli("bench", "tiny-llama", "--contexts", "16,24", "--new-tokens", "3", "--repeats", "1",
                         "--dtype", "fp32", timeout=600)
    assert code == 0, out + err
    assert "cells: 12/12" in out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in out
    assert sum(1 for line in lines if "flashpatch" in line.split()[2:3]) == 4  # one row per context x regime


def test_verify_progress_reaches_a_log():
    code, out, err = cli("verify", "tiny-llama", "--text", WIKITEXT, *QUICK)
    assert code == 0, out + err
    assert re.search(r"windows, unpatched then patched: (\d+)/\1 ", out) and "PASS" in out, out


def test_version_and_every_option_has_help():
    import typer.main

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("flashpatch ")
    command = typer.main.get_command(app)
    for name, sub in command.commands.items():
        for param in sub.params:
            assert getattr(param, "help", None), f"flashpatch {name} {param.name} has no help text"
    assert "NOT SERVED" in runner.invoke(app, ["verify", "--help"]).output


def test_info_says_what_apply_and_the_cli_each_run_here():
    result = runner.invoke(app, ["info", "--json"])
    data = json.loads(result.output)
    assert {"kernel_path", "cli_kernel_path"} <= data.keys()
    if data["device"] == "cpu":
        assert data["cli_kernel_path"]["name"] == "triton-interpreter"


def test_cpu_plot_has_no_empty_memory_panel(tmp_path):
    """No GPU, no peak memory: the plot is the speed panel alone, with its legend."""
    import struct

    pytest.importorskip("matplotlib")
    from flashpatch.bench.generate import GenRow, plot

    rows = [GenRow(impl, c, "warm", [c], e2e_tok_s=float(c)) for impl in ("sdpa", "flashpatch") for c in (16, 32)]
    png = tmp_path / "plot.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns about a legend with nothing in it
        plot(rows, str(png), "cpu")
    width = struct.unpack(">I", png.read_bytes()[16:20])[0]
    assert width < 1000  # one panel (two are 1440 px wide)


def test_bench_cells_that_would_fall_back_say_so(monkeypatch, tmp_path):
    """A flashpatch cell whose calls would run the original attention is not timed: it says 'not served', exit 3."""
    from flashpatch import adapter

    monkeypatch.setattr(adapter, "_unsupported_feature", lambda attention_mask, kwargs: "an injected reason")
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", "tiny-llama", "--contexts", "16", "--new-tokens", "2", "--repeats", "1",
                                 "--dtype", "fp32", "--baselines", "sdpa", "--json", str(out)])
    assert result.exit_code == 3, result.output
    rows = json.loads(out.read_text())["rows"]
    ours = [r for r in rows if r["impl"] == "flashpatch"]
    assert ours and all(r["error"] == "not served: an injected reason (fallback='error')" and r["e2e_tok_s"] is None
                        for r in ours), ours
    assert all(r["error"] is None for r in rows if r["impl"] == "sdpa")
