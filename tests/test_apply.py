"""flashpatch.apply on tiny models of every registry entry: parity, padding, generation, restore."""

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

import flashpatch
from flashpatch import adapter
from models import DEVICE, TINY_CONFIGS, VOCAB, tiny_model, token_ids

ARCHS = list(TINY_CONFIGS)
EXPECTED_ENTRY = {"llama": "llama", "gpt2": "gpt2", "gpt2-layer-scaled": "gpt2", "gptj": "gptj",
                  "gpt_neox-80": "gpt_neox", "gpt_neox-96": "gpt_neox", "qwen2-generic": "qwen2", "mistral": "mistral",
                  "qwen2-sliding": "qwen2", "qwen3": "qwen2", "phi3": "phi3", "gemma2": "gemma2", "gemma3": "gemma3",
                  "gpt_oss": "gpt_oss"}


def logits(model, ids, mask=None):
    # positions count real tokens only (as generate does), so absolute position embeddings ignore padding
    position_ids = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=position_ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_logits_match_eager(arch):
    model = tiny_model(arch)
    ids = token_ids(2, 37)
    before = logits(model, ids)
    report = flashpatch.apply(model, fallback="error")
    assert report.patched and report.entry == EXPECTED_ENTRY[arch]
    assert report.layers_patched == model.config.num_hidden_layers
    after = logits(model, ids)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert not report.fallbacks


@pytest.mark.parametrize("arch", ["llama", "gpt2-layer-scaled", "gptj", "gpt_neox-80"])
def test_fp16_within_fa2_rule(arch):
    # GPT-2's eager reorder_and_upcast path itself fails in fp16 on CPU (transformers' autocast check)
    overrides = {"reorder_and_upcast_attn": False} if arch.startswith("gpt2") else {}
    model64 = tiny_model(arch, **overrides).double()
    ids = token_ids(1, 29)
    ref = logits(model64, ids)
    model16 = tiny_model(arch, dtype=torch.float16, **overrides)
    model16.load_state_dict({k: v.half() for k, v in model64.state_dict().items()})
    eager_err = (logits(model16, ids).double() - ref).abs().max().item()
    flashpatch.apply(model16, fallback="error")
    ours_err = (logits(model16, ids).double() - ref).abs().max().item()
    assert ours_err <= 2 * eager_err + 1e-3, (ours_err, eager_err)


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_equals_each_sequence_alone(arch):
    model = tiny_model(arch)
    flashpatch.apply(model, fallback="error")
    lengths = [19, 11, 4]
    seqs = [token_ids(n) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(seqs), width, dtype=torch.long, device=DEVICE)
    mask = torch.zeros(len(seqs), width, dtype=torch.long, device=DEVICE)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):], mask[i, width - len(s):] = s, 1
    batched = logits(model, ids, mask)
    for i, s in enumerate(seqs):
        alone = logits(model, s[None])
        torch.testing.assert_close(batched[i, width - len(s):], alone[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_identical_and_decode_is_patched(arch, monkeypatch):
    model = tiny_model(arch)
    prompt = token_ids(1, 9)
    gen = dict(max_new_tokens=20, do_sample=False, min_new_tokens=20)
    with torch.no_grad():
        expected = model.generate(prompt, **gen)
    from flashpatch.kernels.decode import DecodePlan

    query_lengths = []
    real = DecodePlan.run

    def counting(plan, q, *a, **kw):
        query_lengths.append(q.shape[2])
        return real(plan, q, *a, **kw)

    monkeypatch.setattr(DecodePlan, "run", counting)
    flashpatch.apply(model, fallback="error")
    with torch.no_grad():
        got = model.generate(prompt, **gen)
    assert torch.equal(got, expected)
    layers = model.config.num_hidden_layers
    assert query_lengths.count(1) == 19 * layers  # every decode step of every layer went through the decode kernel


@pytest.mark.parametrize("padded", [False, True])
def test_dynamic_cache_decode_reads_a_mask_only_with_padding(padded, monkeypatch):
    """An unpadded decode step over a DynamicCache is causal alone (the mask function returns None after one host
    check, as transformers' flash-attention mask does); a padded batch's steps get the bool key mask."""
    from flashpatch.kernels.decode import DecodePlan

    model = tiny_model("llama")
    ids = token_ids(2, 11)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :int(torch.randint(1, 8, ()))] = 0
    gen = dict(attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(ids, **gen)
    masks = []
    real = DecodePlan.run

    def spy(plan, q, k, v, key_padding_mask=None, *args):
        masks.append(key_padding_mask)
        return real(plan, q, k, v, key_padding_mask, *args)

    monkeypatch.setattr(DecodePlan, "run", spy)
    flashpatch.apply(model, fallback="error")
    with torch.no_grad():
        got = model.generate(ids, **gen)
    assert torch.equal(got, expected)
    assert len(masks) == 5 * model.config.num_hidden_layers  # an 11-token prefill also takes the decode kernel
    if padded:
        assert all(m is not None and m.dtype == torch.bool and m[:, -1].all() and not m[1].all() for m in masks)
    else:
        assert all(m is None for m in masks)


def test_unapply_is_bit_identical_and_apply_twice_is_harmless():
    model = tiny_model("llama", attn="sdpa")
    ids = token_ids(2, 17)
    original = logits(model, ids)
    first = flashpatch.apply(model)
    second = flashpatch.apply(model)
    assert second.patched and second.original_impl == "sdpa" == first.original_impl
    assert model.config._attn_implementation == adapter.IMPL_NAME
    assert flashpatch.unapply(model)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(logits(model, ids), original)
    assert not flashpatch.unapply(model)


def test_context_manager_restores_on_exception():
    model = tiny_model("gpt2")
    with pytest.raises(KeyError):
        with flashpatch.patched(model) as report:
            assert report.patched and model.config._attn_implementation == adapter.IMPL_NAME
            raise KeyError("boom")
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("cls", [AutoModel, AutoModelForSequenceClassification])
def test_base_and_classification_classes(cls):
    model = tiny_model("llama", cls=cls)
    ids = token_ids(2, 13)
    with torch.no_grad():
        before = model(ids)[0]
        report = flashpatch.apply(model, fallback="error")
        after = model(ids)[0]
    assert report.patched and report.entry == "llama"
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_torch_compile_wrapper_is_detected():
    model = tiny_model("gpt_neox-80")
    compiled = torch.compile(model)
    report = flashpatch.apply(compiled, fallback="error")
    assert report.patched and report.entry == "gpt_neox"
    assert model.config._attn_implementation == adapter.IMPL_NAME
    flashpatch.unapply(compiled)
    assert model.config._attn_implementation == "eager"


def test_peft_lora_wrapper_is_detected():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    ids = token_ids(1, 15)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        before = lora(input_ids=ids).logits
        report = flashpatch.apply(lora, fallback="error")
        after = lora(input_ids=ids).logits
    assert report.patched and report.entry == "llama"
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type,overrides,reason", [
    ("mistral", dict(sliding_window=16), "sliding-window"),
    ("gemma2", dict(attn_logit_softcapping=50.0, head_dim=32), "softcapping"),
])
def test_features_of_classes_without_the_flash_kwargs_are_left_alone_with_reason(model_type, overrides, reason,
                                                                                   monkeypatch):
    """The kernels learn sliding windows, softcaps and sinks from the attention call's kwargs, which transformers
    passes on for classes that take its flash-attention path: a class that does not is refused by name."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=64, num_attention_heads=2,
                                  num_key_value_heads=1, num_hidden_layers=1, vocab_size=VOCAB, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(DEVICE)
    monkeypatch.setattr(type(model), "_supports_flash_attn", False)
    with pytest.warns(UserWarning, match=reason):
        report = flashpatch.apply(model)
    assert not report.patched and any(reason in r for r in report.reasons)
    assert model.config._attn_implementation == "eager"
    with pytest.raises(flashpatch.UnsupportedModelError, match=reason):
        flashpatch.apply(model, fallback="error")


def test_not_a_transformers_model():
    with pytest.raises(flashpatch.UnsupportedModelError, match="not a transformers model"):
        flashpatch.apply(torch.nn.Linear(4, 4))


def test_output_attentions_falls_back_to_original_with_warning():
    model = tiny_model("gpt2")
    ids = token_ids(1, 12)
    with torch.no_grad():
        expected = model(ids, output_attentions=True)
    report = flashpatch.apply(model)
    with pytest.warns(UserWarning, match="output_attentions"), torch.no_grad():
        got = model(ids, output_attentions=True)
    torch.testing.assert_close(got.logits, expected.logits)
    assert got.attentions[0] is not None
    assert report.fallbacks["output_attentions=True needs the attention weights"] == model.config.n_layer
    flashpatch.apply(model, fallback="error")
    with pytest.raises(flashpatch.FallbackError, match="output_attentions"), torch.no_grad():
        model(ids, output_attentions=True)


def test_dropout_in_training_runs_in_the_kernels():
    model = tiny_model("gpt2", attn_pdrop=0.3).train()
    report = flashpatch.apply(model, fallback="error")
    ids = token_ids(1, 12)
    torch.manual_seed(1)
    first = model(ids).logits
    torch.manual_seed(1)
    again = model(ids).logits
    torch.manual_seed(2)
    other = model(ids).logits
    assert torch.equal(first, again) and not torch.equal(first, other)  # seeded by torch's generator
    first.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    assert not report.fallbacks
    model.eval()
    with torch.no_grad():
        flashpatch.unapply(model)
        expected = model(ids).logits
        flashpatch.apply(model)
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-4)  # eval: no dropout


def test_training_without_dropout_is_served_and_differentiable():
    model = tiny_model("llama").train()
    ids = token_ids(2, 16)
    loss_ref = model(ids, labels=ids).loss
    loss_ref.backward()
    grads_ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    report = flashpatch.apply(model, fallback="error")
    loss = model(ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-5)
    for p, g in zip(model.parameters(), grads_ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-5)
    assert not report.fallbacks


def test_report_prints_and_serialises():
    import json

    report = flashpatch.apply(tiny_model("gptj"))
    text = str(report)
    assert "gptj" in text and "kernel path" in text
    assert json.loads(json.dumps(report.to_dict()))["entry"] == "gptj"
