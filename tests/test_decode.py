"""Flash-decoding kernel and device-side cache lengths (seqused_k) against float64 references."""

import pytest
import torch

import flashpatch
from flashpatch import AttentionInputError
from flashpatch.kernels import TileConfig, flash_decode_forward
from flashpatch.reference import reference_attention
from helpers import assert_fa2_rule, random_qkv


@pytest.mark.parametrize("seq_q", [1, 2, 5, 16])
@pytest.mark.parametrize("heads_q,heads_k", [(4, 4), (9, 3), (8, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_query_counts(seq_q, heads_q, heads_k, dtype, device, poison_empty):
    seq_k = int(torch.randint(seq_q, 300, ()).item())  # odd cache lengths, fresh each run
    q, k, v = random_qkv(2, heads_q, heads_k, seq_q, seq_k, 64, dtype, device)
    out = flashpatch.attention(q, k, v, causal=True)
    assert_fa2_rule(out, q, k, v, causal=True)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
@pytest.mark.parametrize("head_dim", [40, 64, 128])
def test_decode_splits_that_do_not_divide(num_splits, head_dim, device, poison_empty):
    q, k, v = random_qkv(2, 6, 2, 3, 203, head_dim, torch.float16, device)
    config = TileConfig(16, 16, 4, 1) if device.type == "cpu" else TileConfig(16, 64, 4, 2)
    run = dict(causal=True, scale=head_dim ** -0.5, key_padding_mask=None, config=config, num_splits=num_splits)
    out, lse = flash_decode_forward(q, k, v, seqused_k=None, **run)
    assert_fa2_rule(out, q, k, v, causal=True)
    scores = (q.double() @ k.double().repeat_interleave(3, 1).transpose(-1, -2)) * head_dim ** -0.5
    scores = scores.masked_fill(torch.ones(3, 203, dtype=torch.bool, device=device).tril(200).logical_not(), -torch.inf)
    assert torch.allclose(lse.double(), torch.logsumexp(scores, -1), atol=1e-3)
    seqused = torch.randint(3, 204, (2,), dtype=torch.int32, device=device)  # splits past the used length
    out, _ = flash_decode_forward(q, k, v, seqused_k=seqused, **run)
    assert_fa2_rule(out, q, k, v, causal=True, seqused_k=seqused)


@pytest.mark.parametrize("seq_k", [40, 203, 517])
def test_split_launches_with_their_own_tile_match_the_reference(seq_k, device, poison_empty):
    """A plan whose split launches take a longer key block, other warps and stages than its row (as Hopper's
    decode does): splits of whole split blocks, a last one ragged, key padding and device-side lengths."""
    from flashpatch.kernels import DecodePlan

    row, split = ((TileConfig(16, 16, 4, 1), TileConfig(16, 32, 2, 1)) if device.type == "cpu"
                  else (TileConfig(16, 64, 4, 4), TileConfig(16, 128, 8, 3)))
    q, k, v = random_qkv(2, 8, 2, 1, seq_k, 64, torch.float16, device)
    mask = torch.rand(2, seq_k, device=device) > 0.3
    mask[:, -1] = True
    seqused = torch.randint(1, seq_k + 1, (2,), dtype=torch.int32, device=device)
    for kpm, used in ((None, None), (mask, None), (None, seqused)):
        plan = DecodePlan(q.shape, q.stride(), 2, q.dtype, causal=True, scale=0.125, has_kpm=kpm is not None,
                          has_seqused=used is not None, config=row, sm_count=16, split_config=split)
        (splits, _, _), split_len, _ = plan._layout(seq_k)
        assert (splits > 1 if seq_k == 517 else True) and (splits == 1 or split_len % split.block_n == 0)
        out, _ = plan.run(q, k, v, kpm, used)
        assert_fa2_rule(out.transpose(1, 2), q, k, v, causal=True, key_padding_mask=kpm, seqused_k=used)


@pytest.mark.parametrize("causal", [False, True])
def test_decode_key_padding(causal, device, poison_empty):
    batch, seq_k = 3, 157
    q, k, v = random_qkv(batch, 8, 2, 4, seq_k, 64, torch.float16, device)
    mask = torch.rand(batch, seq_k, device=device) > 0.3
    mask[2] = False  # a sequence with nothing to attend to returns zeros
    out = flashpatch.attention(q, k, v, causal=causal, key_padding_mask=mask)
    assert out[2].abs().max() == 0
    assert_fa2_rule(out[:2], q[:2], k[:2], v[:2], causal=causal, key_padding_mask=mask[:2])


@pytest.mark.parametrize("seq_q", [1, 4, 16, 40])  # 40 query rows: the prefill kernel reads seqused_k too
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_seqused_k_matches_sliced_cache(seq_q, dtype, device, poison_empty):
    batch, buffer = 3, 211
    q, k, v = random_qkv(batch, 6, 3, seq_q, buffer, 64, dtype, device)
    seqused = torch.randint(seq_q, buffer, (batch,), dtype=torch.int32, device=device)  # the last key is unused
    k[:, :, -1] = 1e4  # garbage past the used length would dominate any row that read it
    out = flashpatch.attention(q, k, v, causal=True, seqused_k=seqused)
    assert_fa2_rule(out, q, k, v, causal=True, seqused_k=seqused)


def test_seqused_k_with_padding_and_empty(device, poison_empty):
    q, k, v = random_qkv(2, 4, 2, 1, 96, 64, torch.float32, device)
    mask = torch.rand(2, 96, device=device) > 0.5
    seqused = torch.tensor([0, 50], dtype=torch.int32, device=device)
    out = flashpatch.attention(q, k, v, causal=True, key_padding_mask=mask, seqused_k=seqused)
    assert out[0].abs().max() == 0
    ref = reference_attention(q[1:].double(), k[1:, :, :50].double(), v[1:, :, :50].double(), causal=True,
                              key_padding_mask=mask[1:, :50])  # the same, by slicing instead of seqused_k
    assert torch.allclose(out[1:].double(), ref, atol=1e-5)
    assert_fa2_rule(out, q, k, v, causal=True, key_padding_mask=mask, seqused_k=seqused)


def test_seqused_k_errors(device):
    q, k, v = random_qkv(2, 4, 2, 1, 16, 64, torch.float32, device)
    with pytest.raises(AttentionInputError, match="int32"):
        flashpatch.attention(q, k, v, seqused_k=torch.tensor([3, 4], device=device))
    with pytest.raises(AttentionInputError, match=r"\[batch\] = \[2\]"):
        flashpatch.attention(q, k, v, seqused_k=torch.tensor([3], dtype=torch.int32, device=device))
    with pytest.raises(AttentionInputError, match="inference"):
        flashpatch.attention(q.requires_grad_(), k, v, seqused_k=torch.tensor([3, 4], dtype=torch.int32, device=device))


def test_cached_split_buffers_are_left_at_zero_grow_and_match_a_fresh_zeroed_buffer(device, monkeypatch,
                                                                                    poison_empty):
    """Split launches count arrivals in a buffer cached per device and stream, which the merging programs put back
    to zero, and keep their partials in its scratch part, which grows (keeping the outgrown buffer alive) when a
    launch needs more; where none can be used (too many counters, or mid CUDA-graph capture) a per-call zeroed
    buffer serves. All give the same bits."""
    from flashpatch.kernels import decode

    q, k, v = random_qkv(2, 8, 4, 1, 300, 64, torch.float16, device)
    config = TileConfig(16, 16, 4, 1) if device.type == "cpu" else TileConfig(16, 64, 4, 2)
    run = dict(causal=True, scale=0.125, key_padding_mask=None, seqused_k=None, config=config)
    monkeypatch.setattr(decode, "_SPLIT_BUFFERS", {})
    monkeypatch.setattr(decode, "_OUTGROWN", [])
    monkeypatch.setattr(decode, "MIN_WORK", 2 * 8 * 4 * 65)  # exactly 4 splits' partials: 5 must grow it
    cached, _ = flash_decode_forward(q, k, v, num_splits=4, **run)
    ((counters, work),) = decode._SPLIT_BUFFERS.values()
    assert counters.dtype == work.dtype == torch.float32 and not counters.any()
    grown, _ = flash_decode_forward(q, k, v, num_splits=5, **run)
    ((counters, bigger),) = decode._SPLIT_BUFFERS.values()
    assert bigger.numel() > work.numel() and decode._OUTGROWN[0][1] is work and not counters.any()
    monkeypatch.setattr(decode, "MAX_COUNTERS", 2 * 4 - 1)  # one fewer than this launch's (batch, KV head) pairs
    fresh, _ = flash_decode_forward(q, k, v, num_splits=4, **run)
    assert torch.equal(cached, fresh)
    assert_fa2_rule(cached, q, k, v, causal=True)
    assert_fa2_rule(grown, q, k, v, causal=True)


@pytest.mark.parametrize("num_splits", [2, 5])
def test_split_merge_repeats_exactly_and_matches_one_split(num_splits, device, poison_empty):
    """The last split to arrive merges: a second launch must give the same bits, one with another split
    count must still be right, and the merged lse must be the unsplit one."""
    q, k, v = random_qkv(3, 8, 2, 2, 190, 64, torch.float16, device)
    config = TileConfig(16, 16, 4, 1) if device.type == "cpu" else TileConfig(16, 64, 4, 2)
    run = dict(causal=True, scale=0.125, key_padding_mask=None, seqused_k=None, config=config)
    first, lse = flash_decode_forward(q, k, v, num_splits=num_splits, **run)
    again, no_lse = flash_decode_forward(q, k, v, num_splits=num_splits, need_lse=False, **run)
    assert no_lse is None and torch.equal(first, again)
    other, _ = flash_decode_forward(q, k, v, num_splits=num_splits + 1, **run)
    assert_fa2_rule(first, q, k, v, causal=True)
    assert_fa2_rule(other, q, k, v, causal=True)
    one, lse_one = flash_decode_forward(q, k, v, num_splits=1, **run)
    assert torch.allclose(lse, lse_one, atol=1e-4)


def test_planned_decode_follows_a_growing_cache_and_rechecks_what_the_plan_does_not_fix(device, monkeypatch,
                                                                                      poison_empty):
    """Inference decode calls of one kind share a DecodePlan while the key length grows (split counts change with
    it), validated once; a call whose key length disagrees between k, v or the mask still gets the general path's
    error."""
    from flashpatch import ops
    from flashpatch.kernels.plans import PLANS

    ops.reset_caches()
    validated = []
    real_check = ops.check_inputs
    monkeypatch.setattr(ops, "check_inputs", lambda *a: validated.append(a) or real_check(*a))
    q = torch.randn(1, 8, 1, 64, device=device, dtype=torch.float16)
    for seq_k in (100, 101, 137, 300):
        _, k, v = random_qkv(1, 8, 2, 1, seq_k, 64, torch.float16, device)
        mask = torch.rand(1, seq_k, device=device) > 0.2
        out = flashpatch.attention(q, k, v, causal=True, key_padding_mask=mask)
        assert_fa2_rule(out, q, k, v, causal=True, key_padding_mask=mask)
    assert len(PLANS) == 1
    (plan,) = PLANS.plans.values()
    assert set(plan.lengths) == {100, 101, 137, 300} and len(validated) == 1
    with pytest.raises(AttentionInputError, match="same shape"):
        flashpatch.attention(q, k, v[:, :, :-1], causal=True, key_padding_mask=mask)
    with pytest.raises(AttentionInputError, match="key_padding_mask must be"):
        flashpatch.attention(q, k, v, causal=True, key_padding_mask=mask[:, :-1])
