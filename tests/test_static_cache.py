"""Static KV cache and transformers' compiled generation through the patched path."""

import warnings

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import CompileConfig

import flashpatch
import flashpatch.kernels
from models import tiny_model, token_ids

ARCHS = ["llama", "gpt2", "gptj", "gpt_neox-80"]


def _prompt(padded: bool):
    prompt = token_ids(2, 20)  # 20 tokens: the prefill kernel; each decode step: the decode kernel
    mask = torch.ones_like(prompt)
    if padded:
        mask[1, :int(torch.randint(1, 15, ()))] = 0
    return prompt, mask


def _generate(model, prompt, mask, **kwargs):
    kwargs.setdefault("disable_compile", "compile_config" not in kwargs)  # on a GPU, generate would compile
    with torch.no_grad():
        return model.generate(prompt, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                              cache_implementation="static", output_logits=True, return_dict_in_generate=True,
                              **kwargs)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("padded", [False, True])
def test_static_cache_logits_match_unpatched(arch, padded, monkeypatch):
    """Max-length buffers where only a prefix holds tokens; the used length reaches the kernels on the device."""
    model = tiny_model(arch)
    prompt, mask = _prompt(padded)
    expected = _generate(model, prompt, mask)
    decode_calls = []
    real_decode = flashpatch.kernels.DecodePlan.run

    def spy(plan, q, k, v, key_padding_mask=None, seqused_k=None, *args):
        decode_calls.append(seqused_k)
        return real_decode(plan, q, k, v, key_padding_mask, seqused_k, *args)

    monkeypatch.setattr(flashpatch.kernels.DecodePlan, "run", spy)
    flashpatch.apply(model, fallback="error")
    got = _generate(model, prompt, mask)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), rtol=1e-4, atol=1e-4)
    assert decode_calls and all(used is not None for used in decode_calls)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_static_cache_fallback_masks_align_to_the_used_length(arch):
    """A call that falls back (attention weights requested) gets a dense mask aligned to the used length."""
    model = tiny_model(arch)
    prompt, mask = _prompt(padded=True)
    expected = _generate(model, prompt, mask, output_attentions=True)
    flashpatch.apply(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = _generate(model, prompt, mask, output_attentions=True)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_compiled_static_generation_one_graph_no_breaks(arch):
    """transformers' own compiled decode (static cache): fullgraph, one graph for every token, same tokens."""
    model = tiny_model(arch)
    prompt, mask = _prompt(padded=True)
    expected = _generate(model, prompt, mask)
    flashpatch.apply(model, fallback="error")
    config = CompileConfig(backend="eager", fullgraph=True, mode=None)  # dynamo's view; no C++ build on CPU
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told
    torch._dynamo.reset()
    counters.clear()
    got = _generate(model, prompt, mask, compile_config=config)
    assert torch.equal(got.sequences, expected.sequences)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"] and not counters["recompiles"]


@pytest.mark.gpu
@pytest.mark.parametrize("max_cache_len", [None, 1024])
def test_cuda_graph_compiled_static_generation(max_cache_len, monkeypatch):
    """transformers' default compiled decode on a GPU (inductor, CUDA graphs through cudagraph trees): every
    allocation the op makes during warm-up and capture must belong to the graph's outputs or die with the call,
    and the tokens must equal the unpatched model's. A 1024-slot cache splits the keys, so the decode kernel's
    cached split buffers (arrival counters, partials) are first made during cudagraph trees' warm-up (the case that must stay out of the
    graph's memory pool)."""
    from flashpatch.kernels import decode

    monkeypatch.setattr(decode, "_SPLIT_BUFFERS", {})
    model = tiny_model("llama")
    prompt, mask = _prompt(padded=True)
    extra = {} if max_cache_len is None else {"max_cache_len": max_cache_len}
    expected = _generate(model, prompt, mask, **extra)
    flashpatch.apply(model, fallback="error")
    torch._dynamo.reset()
    config = CompileConfig(fullgraph=True, mode="reduce-overhead")
    first = _generate(model, prompt, mask, compile_config=config, **extra)
    again = _generate(model, prompt, mask, compile_config=config, **extra)  # replays the captured graphs
    if max_cache_len:
        assert decode._SPLIT_BUFFERS and all(not c.any() for c, _ in decode._SPLIT_BUFFERS.values())  # made, left 0
    assert torch.equal(first.sequences, again.sequences) and torch.equal(first.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(first.logits), torch.stack(expected.logits), rtol=1e-3, atol=1e-3)
