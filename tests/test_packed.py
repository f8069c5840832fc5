"""Padding-free packed batches (segment ids): forward and backward against float64 references."""

import pytest
import torch

import flashpatch
from flashpatch import AttentionInputError
from flashpatch.reference import reference_attention
from helpers import assert_fa2_rule, random_qkv
from test_backward import check, no_reference_fallback  # noqa: F401  (the fixture refuses the PyTorch fallback)


def packed_segments(batch, seq, device):
    """Random sequence lengths laid end to end in each row, ids 0, 1, 2, ... (what position_ids restarts give)."""
    rows = []
    for _ in range(batch):
        cuts = torch.randperm(seq - 1)[: int(torch.randint(0, 5, ()))] + 1
        starts = torch.zeros(seq, dtype=torch.long)
        starts[cuts] = 1
        rows.append(starts.cumsum(0))
    return torch.stack(rows).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq", [1, 37, 96])
def test_forward(seq, causal, dtype, device, poison_empty):
    q, k, v = random_qkv(2, 6, 2, seq, seq, 64, dtype, device)
    segments = packed_segments(2, seq, device)
    out = flashpatch.attention(q, k, v, causal=causal, segment_ids=segments)
    assert_fa2_rule(out, q, k, v, causal=causal, segment_ids=segments)


def test_forward_equals_each_sequence_alone(device):
    q, k, v = random_qkv(1, 4, 4, 50, 50, 32, torch.float32, device)
    segments = torch.tensor([0] * 20 + [1] * 13 + [2] * 17, device=device)[None]
    out = flashpatch.attention(q, k, v, causal=True, segment_ids=segments)
    for lo, hi in ((0, 20), (20, 33), (33, 50)):
        alone = reference_attention(q[:, :, lo:hi].double(), k[:, :, lo:hi].double(), v[:, :, lo:hi].double(),
                                    causal=True)
        torch.testing.assert_close(out[:, :, lo:hi].double(), alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads_q,heads_k,seq", [(4, 2, 45), (3, 3, 70), (8, 1, 33)])
def test_backward(heads_q, heads_k, seq, causal, dtype, device, poison_empty):
    q, k, v = random_qkv(2, heads_q, heads_k, seq, seq, 64, dtype, device)
    check(q, k, v, causal=causal, segment_ids=packed_segments(2, seq, device))


def test_errors(device):
    q, k, v = random_qkv(2, 4, 2, 10, 12, 64, torch.float32, device)
    with pytest.raises(AttentionInputError, match="Sq == Sk"):
        flashpatch.attention(q, k, v, segment_ids=torch.zeros(2, 10, dtype=torch.int32, device=device))
    q, k, v = random_qkv(2, 4, 2, 10, 10, 64, torch.float32, device)
    with pytest.raises(AttentionInputError, match="integer tensor"):
        flashpatch.attention(q, k, v, segment_ids=torch.zeros(2, 10, device=device))


@pytest.mark.parametrize("arch", ["llama", "gpt_neox-80", "qwen2-generic"])
def test_packed_batch_through_apply(arch):
    """position_ids restarting per sequence, no attention mask (DataCollatorWithFlattening): served by the
    kernels with segment ids, logits equal the unpatched model's and each sequence's alone, gradients flow."""
    from models import tiny_model, token_ids

    model = tiny_model(arch)
    lengths = (15, 12, 13)
    ids = token_ids(1, sum(lengths))
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(ids.device)
    with torch.no_grad():
        expected = model(ids, position_ids=positions, use_cache=False).logits  # no cache: transformers' packed path
        alone = torch.cat([model(part, use_cache=False).logits for part in ids.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(expected, alone, rtol=1e-4, atol=1e-4)  # the unpatched model does separate them
    report = flashpatch.apply(model, fallback="error")
    with torch.no_grad():
        got = model(ids, position_ids=positions, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    model.train()
    model(ids, position_ids=positions, labels=ids).loss.backward()
    assert not report.fallbacks
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_packed_batch_under_torch_compile_falls_back_correctly():
    """Under dynamo the packed mask function can't be inspected: those calls run the model's own attention,
    with fullgraph=True and the same logits."""
    from models import tiny_model, token_ids

    model = tiny_model("llama")
    ids = token_ids(1, 40)
    positions = torch.cat([torch.arange(n) for n in (15, 12, 13)])[None].to(ids.device)
    with torch.no_grad():
        expected = model(ids, position_ids=positions, use_cache=False).logits
        flashpatch.apply(model)
        torch._dynamo.reset()
        got = torch.compile(model, backend="eager", fullgraph=True)(ids, position_ids=positions, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_segment_planes_bound_each_position_by_its_run():
    """The kernels skip blocks outside a tile's runs: each position's run of equal ids is its segment where the ids
    never decrease; a row whose ids decrease (a segment in two runs) gets the whole row."""
    from flashpatch.kernels.forward import segment_planes

    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [5, 5, 7, 7, 7, 7, 9, 9], [0, 0, 1, 1, 0, 0, 2, 2]])
    planes = segment_planes(ids)
    assert planes.dtype == torch.int32 and planes.shape == (3, 3, 8) and planes.is_contiguous()
    assert planes[0].tolist() == ids.tolist()
    assert planes[1, 0].tolist() == [0, 0, 0, 3, 3, 5, 5, 5] and planes[2, 0].tolist() == [3, 3, 3, 5, 5, 8, 8, 8]
    assert planes[1, 1].tolist() == [0, 0, 2, 2, 2, 2, 6, 6] and planes[2, 1].tolist() == [2, 2, 6, 6, 6, 6, 8, 8]
    assert planes[1, 2].tolist() == [0] * 8 and planes[2, 2].tolist() == [8] * 8


def test_segment_planes_are_made_once_per_ids_tensor_until_it_changes():
    """A step's layers pass one ids tensor, forward and backward: its planes are reused; an in-place change, another
    tensor with the same ids, or an inference tensor get planes of their own, and every answer is right."""
    from flashpatch.kernels.forward import segment_planes

    ids = torch.tensor([[0, 0, 1, 1, 1, 2]])
    first = segment_planes(ids)
    assert segment_planes(ids) is first
    ids[0, 5] = 1  # in place: the version counter moves
    changed = segment_planes(ids)
    assert changed is not first and changed[2, 0].tolist() == [2, 2, 6, 6, 6, 6]
    other = ids.clone()
    assert segment_planes(other) is not changed and torch.equal(segment_planes(other), changed)
    with torch.inference_mode():
        frozen = torch.tensor([[0, 1, 1]])
        assert segment_planes(frozen)[1, 0].tolist() == [0, 1, 1]
        assert segment_planes(frozen) is not segment_planes(frozen)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", ["short", "one-long", "unordered", "split-segment"])
def test_many_segments_forward_and_backward(layout, causal, device, poison_empty):
    """Rows of many short sequences, so that most key (query) blocks lie outside a tile's sequences and are
    skipped; one sequence spanning many blocks; ids that decrease; a segment id in two runs (nothing skipped)."""
    seq = 203
    lengths = {"short": [3, 17, 1, 30, 2, 45, 9, 64, 32], "one-long": [5, 190, 8]}.get(layout)
    if lengths is not None:
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None].repeat(2, 1)
        ids[1] = ids[1].flip(0).neg() + ids[1].max()  # the same runs in reverse order, still non-decreasing
    elif layout == "unordered":
        ids = (torch.arange(seq) // 25 * 7 % 5)[None].repeat(2, 1)  # runs of 25 with ids 0, 2, 4, 1, 3, 0, ...
    else:
        ids = torch.cat([torch.zeros(60), torch.ones(80), torch.zeros(63)]).long()[None].repeat(2, 1)
    ids = ids.to(device)
    q, k, v = random_qkv(2, 4, 2, seq, seq, 32, torch.float32, device)
    out = flashpatch.attention(q, k, v, causal=causal, segment_ids=ids)
    assert_fa2_rule(out, q, k, v, causal=causal, segment_ids=ids)
    check(q, k, v, causal=causal, segment_ids=ids)


@pytest.mark.parametrize("window", [(20, 0), (40, 7)])
def test_many_segments_with_a_window(window, device, poison_empty):
    """A sliding window inside packed sequences: the band's blocks and the sequences' blocks, both narrowed."""
    lengths = [3, 17, 1, 30, 2, 45, 9, 64, 32]
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None].to(device)
    q, k, v = random_qkv(1, 4, 2, 203, 203, 32, torch.float32, device)
    out = flashpatch.attention(q, k, v, causal=window[1] == 0, segment_ids=ids, window=window)
    assert_fa2_rule(out, q, k, v, causal=window[1] == 0, segment_ids=ids, window=window)
    check(q, k, v, causal=window[1] == 0, segment_ids=ids, window=window)
