"""Architectures whose attention has sliding windows, logit softcapping or sinks (Mistral, Qwen2/Qwen3 with sliding
layers, Phi-3, Gemma 2, Gemma 3, gpt-oss), patched: the features reach the kernels, the report counts them, caches
with sliding-window layers, training, packed batches and fallbacks. tests/test_apply.py runs its parity, padding
and generation tests over these tiny models too (they are in TINY_CONFIGS)."""

import warnings

import pytest
import torch

import flashpatch
from flashpatch import adapter
from models import DEVICE, tiny_model, token_ids

FEATURES = {"mistral": {"sliding_window": 2}, "qwen2-sliding": {"sliding_window": 1}, "qwen3": {"sliding_window": 1},
            "phi3": {"sliding_window": 2}, "gemma2": {"sliding_window": 1, "softcap": 2},
            "gemma3": {"sliding_window": 2}, "gpt_oss": {"sliding_window": 1, "sinks": 2}}


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


@pytest.fixture
def calls(monkeypatch):
    """The op's keyword arguments of every patched attention call."""
    seen = []
    real = adapter.attention_bshd

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(adapter, "attention_bshd", spy)
    return seen


@pytest.mark.parametrize("arch", list(FEATURES))
def test_features_reach_the_kernels_and_the_report(arch, calls):
    model = tiny_model(arch)
    ids = token_ids(2, 29)  # longer than the windows (8)
    expected = logits(model, ids)
    report = flashpatch.apply(model, fallback="error")
    assert report.features == FEATURES[arch]
    assert all(name in str(report) for name in FEATURES[arch])
    got = logits(model, ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    windows = [c["window"] for c in calls]
    assert windows.count((7, 0)) == FEATURES[arch]["sliding_window"]
    assert sum(w is None for w in windows) == model.config.num_hidden_layers - FEATURES[arch]["sliding_window"]
    assert sum(c["softcap"] is not None for c in calls) == FEATURES[arch].get("softcap", 0)
    assert sum(c["sinks"] is not None for c in calls) == FEATURES[arch].get("sinks", 0)


@pytest.mark.parametrize("arch,dropped", [("mistral", "window"), ("gemma2", "window"), ("gemma2", "softcap"),
                                          ("gpt_oss", "sinks")])
def test_each_feature_changes_these_models_logits(arch, dropped, monkeypatch):
    """The tiny configs exercise each feature: without it the patched logits leave eager's."""
    model = tiny_model(arch)
    ids = token_ids(1, 29)
    expected = logits(model, ids)
    flashpatch.apply(model, fallback="error")
    real = adapter.attention_bshd
    monkeypatch.setattr(adapter, "attention_bshd", lambda *a, **kw: real(*a, **{**kw, dropped: None}))
    assert (logits(model, ids) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gpt_oss"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_sliding_window_caches_generate_like_eager(arch, padded, cache):
    """transformers' DynamicSlidingWindowLayer (the default cache) and StaticSlidingWindowLayer keep only the last
    W - 1 keys (their key j is token kv_offset + j): generations past the window, left-padded batches."""
    model = tiny_model(arch)
    prompt = token_ids(2, 13)
    mask = torch.ones_like(prompt)
    if padded:  # 8 pads: the first decode steps' windows still hold some of them
        mask[1, :8] = 0
    gen = dict(attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False, output_logits=True,
               return_dict_in_generate=True, disable_compile=True)
    if cache == "static":
        gen["cache_implementation"] = "static"
    with torch.no_grad():
        expected = model.generate(prompt, **gen)
    report = flashpatch.apply(model, fallback="error")
    with torch.no_grad():
        got = model.generate(prompt, **gen)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), rtol=1e-4, atol=1e-4)
    assert not report.fallbacks


def test_sliding_window_mask_keys_follow_the_cache_offset():
    """flashpatch_mask for a full DynamicSlidingWindowLayer (kv_offset > 0): the key mask is the padding of the
    tokens the cache holds, and the current token's key marks where the diagonal ends."""
    from transformers import masking_utils

    attention_mask = torch.ones(2, 20, dtype=torch.bool)
    attention_mask[1, :14] = False
    fn = masking_utils.sliding_window_causal_mask_function(8)
    out = adapter.flashpatch_mask(batch_size=2, q_length=1, kv_length=8, q_offset=19, kv_offset=12,
                                  mask_function=fn, attention_mask=attention_mask)
    assert out.shape == (2, 8)
    assert out[0].all() and torch.equal(out[1], attention_mask[1, 12:20])
    # no padding: causal alone, as for a full-attention layer
    assert adapter.flashpatch_mask(batch_size=2, q_length=1, kv_length=8, q_offset=19, kv_offset=12,
                                   mask_function=fn, attention_mask=torch.ones(2, 20, dtype=torch.bool)) is None


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gpt_oss"])
def test_training_gradients_match_eager(arch):
    """Window, softcap (d tanh) and sinks (d s_aux) in the backward kernels, through a model's loss."""
    model = tiny_model(arch).train()
    ids = token_ids(2, 21)
    model(ids, labels=ids).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    report = flashpatch.apply(model, fallback="error")
    model(ids, labels=ids).loss.backward()
    assert not report.fallbacks
    for name, p in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-3, atol=1e-5, msg=name)
    if arch == "gpt_oss":
        assert all(m.sinks.grad.abs().max() > 0 for m in model.modules() if hasattr(m, "sinks"))


def test_packed_batch_with_sliding_windows():
    """position_ids restarting per sequence, no mask (DataCollatorWithFlattening): segment ids and the window
    together; each sequence alone gives the same logits."""
    model = tiny_model("mistral")
    lengths = (15, 12, 13)
    ids = token_ids(1, sum(lengths))
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(ids.device)
    with torch.no_grad():
        expected = model(ids, position_ids=positions, use_cache=False).logits
        report = flashpatch.apply(model, fallback="error")
        got = model(ids, position_ids=positions, use_cache=False).logits
        alone = torch.cat([model(part, use_cache=False).logits for part in ids.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, alone, rtol=1e-4, atol=1e-4)
    assert not report.fallbacks


@pytest.mark.parametrize("arch", ["gemma2", "gpt_oss"])
def test_fallbacks_of_models_without_sdpa_run_eager(arch):
    """transformers has no sdpa for Gemma 2 (softcapping) or gpt-oss (sinks): calls flashpatch does not serve
    (attention weights requested) run eager, with the window in the dense mask."""
    model = tiny_model(arch)
    ids = token_ids(1, 21)
    with torch.no_grad():
        expected = model(ids, output_attentions=True)
    report = flashpatch.apply(model)
    with pytest.warns(UserWarning, match="'eager'"), torch.no_grad():
        got = model(ids, output_attentions=True)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-4, atol=1e-4)
    assert sum(report.fallbacks.values()) == model.config.num_hidden_layers


def test_fallback_implementation_choice():
    module = tiny_model("gemma2").model.layers[0].self_attn
    key_mask = torch.ones(1, 5, dtype=torch.bool)
    dense = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    assert adapter._fallback_impl("eager", None, module, sdpa_ok=False) == "eager"
    assert adapter._fallback_impl("flex_attention", None, module, sdpa_ok=False) == "eager"
    assert adapter._fallback_impl("flex_attention", None, module, sdpa_ok=True) == "sdpa"
    assert adapter._fallback_impl("flash_attention_2", key_mask, module, sdpa_ok=False) == "flash_attention_2"
    assert adapter._fallback_impl("flash_attention_2", dense, module, sdpa_ok=False) == "eager"
    assert adapter._fallback_impl("sdpa", None, module, sdpa_ok=True) == "sdpa"


def test_still_refused_by_name():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("bloom", hidden_size=64, n_head=2, n_layer=1, vocab_size=96)
    model = AutoModelForCausalLM.from_config(config).to(DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = flashpatch.apply(model)
    assert not report.patched and any("ALiBi" in r for r in report.reasons)


@pytest.mark.parametrize("name,features,real", [
    ("mistral-7b-v0.1", {"sliding_window": 2}, dict(num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                                    sliding_window=4096, num_hidden_layers=32)),
    ("gemma2-9b", {"sliding_window": 1, "softcap": 2},
     dict(num_attention_heads=16, num_key_value_heads=8, head_dim=256, sliding_window=4096, num_hidden_layers=42,
          attn_logit_softcapping=50.0, query_pre_attn_scalar=256)),
    ("gpt-oss-20b", {"sliding_window": 1, "sinks": 2},
     dict(num_attention_heads=64, num_key_value_heads=8, head_dim=64, sliding_window=128, num_hidden_layers=24,
          num_local_experts=32)),
])
def test_feature_presets_carry_their_configs_and_are_served(name, features, real):
    """The presets of the models that need windows, softcap and sinks: their checkpoints' attention config; two
    blocks at a fraction of the width (head dims kept) are served with every feature and match the model's own
    attention on a left-padded batch, windows shorter than the prompt included."""
    from flashpatch.presets import build_model, preset

    config = preset(name).config()
    assert {key: getattr(config, key) for key in real} == real
    window = 6  # shorter than the 24-token prompts, so the band is exercised
    model = build_model(name, layers=2, scale=8, vocab_size=256, dtype=torch.float32, device=DEVICE,
                        sliding_window=window, **({"num_local_experts": 4} if name == "gpt-oss-20b" else {}))
    assert model.config.head_dim == real["head_dim"]
    ids = torch.randint(0, 256, (2, 24), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    expected = logits(model, ids, mask)
    with flashpatch.patched(model, fallback="error") as report:
        assert report.patched and report.features == features, (report.reasons, report.features)
        got = logits(model, ids, mask)
    assert torch.allclose(got[mask.bool()], expected[mask.bool()], atol=1e-4, rtol=1e-4)
