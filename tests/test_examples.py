"""The fine-tuning examples run a few steps (CPU smoke; their real numbers come from a GPU)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import WIKITEXT

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
TINY = ["--context", "32", "--batch-size", "2", "--max-steps", "3", "--max-tokens", "2048", "--text", WIKITEXT]


def run_example(script, *args, tmp_path):
    out = tmp_path / f"{script}-{len(list(tmp_path.iterdir()))}.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script sets it without a GPU
    res = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), *TINY, *args, "--json", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


def test_gpt2_patched_trains_like_unpatched(tmp_path):
    common = ["--layers", "2", "--width", "128", "--seed", "3", "--attn-dropout", "0"]  # same masks: none
    ours = run_example("finetune_gpt2.py", *common, tmp_path=tmp_path)
    theirs = run_example("finetune_gpt2.py", *common, "--no-flashpatch", tmp_path=tmp_path)
    assert ours["flashpatch"] and not theirs["flashpatch"]
    assert ours["steps"] == 3 and len(ours["losses"]) == 3
    assert not ours["fallbacks"], ours["fallbacks"]  # every training call went through the kernels
    for a, b in zip(ours["losses"], theirs["losses"]):
        assert a == pytest.approx(b, rel=1e-3)
    assert ours["steady_samples_per_second"] > 0 and ours["steady_after_steps"] == 1  # 3 steps: nothing to skip
    png = tmp_path / "losses.png"
    runs = sorted(str(p) for p in tmp_path.glob("*.json"))
    res = subprocess.run([sys.executable, os.path.join(EXAMPLES, "plot_losses.py"), *runs, "--out", str(png)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpt2_attention_dropout_trains_in_the_kernels(tmp_path):
    summary = run_example("finetune_gpt2.py", "--layers", "2", "--width", "128", tmp_path=tmp_path)
    assert summary["steps"] == 3 and not summary["fallbacks"]
    assert all(loss == loss for loss in summary["losses"])  # finite, not NaN


def test_llama_packed_batches_train_in_the_kernels(tmp_path):
    """DataCollatorWithFlattening: position_ids restart per sequence, no padding; served with segment ids."""
    common = ["--model", "tiny-llama", "--packed", "--seed", "5"]
    ours = run_example("finetune_llama.py", *common, tmp_path=tmp_path)
    theirs = run_example("finetune_llama.py", *common, "--no-flashpatch", tmp_path=tmp_path)
    assert ours["steps"] == 3 and ours["packed"]
    assert not ours["fallbacks"], ours["fallbacks"]
    for a, b in zip(ours["losses"], theirs["losses"]):
        assert a == pytest.approx(b, rel=1e-3)
