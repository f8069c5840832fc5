"""The tensor-descriptor (TMA) forward against float64, in the interpreter; and when it may serve a call."""

import pytest
import torch

from flashpatch.kernels import TileConfig, flash_attn_forward
from flashpatch.kernels import forward_tma
from flashpatch.kernels.forward_tma import flash_attn_forward_tma, tma_eligible
from helpers import assert_fa2_rule, bshd, random_qkv

TMA_TILES = TileConfig(32, 16, 4, 1, tma=True)  # small tiles: short sequences still cross blocks and the diagonal


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q,seq_k", [(1, 1), (17, 17), (40, 40), (33, 70), (70, 33), (5, 64)])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_matches_float64(seq_q, seq_k, causal, layout, device, poison_empty):
    q, k, v = random_qkv(2, 4, 2, seq_q, seq_k, 64, torch.float16, device)
    if layout == "bshd":
        q, k, v = bshd(q), bshd(k), bshd(v)
    assert tma_eligible(q, k, v, plain=True)
    out, lse = flash_attn_forward_tma(q, k, v, causal=causal, scale=0.125, config=TMA_TILES)
    assert_fa2_rule(out, q, k, v, causal=causal)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double().repeat_interleave(2, 1)) * 0.125
    if causal:
        rows, cols = torch.arange(seq_q, device=device), torch.arange(seq_k, device=device)
        visible = cols[None, :] <= rows[:, None] + seq_k - seq_q
        scores = scores.masked_fill(~visible, float("-inf"))
    expected_lse = torch.logsumexp(scores, -1)
    finite = torch.isfinite(expected_lse)
    assert torch.equal(torch.isfinite(lse), finite)  # rows that see no key: -inf (and zero output)
    torch.testing.assert_close(lse.double()[finite], expected_lse[finite], atol=2e-3, rtol=1e-3)
    assert (out[..., ~finite[0, 0], :] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_warp_specialized_loop_matches_the_plain_one(causal, device):
    """The warp-specialise flag changes how Triton schedules the unmasked loop, never the numbers."""
    q, k, v = random_qkv(2, 4, 2, 70, 70, 64, torch.float16, device)
    ws = TileConfig(32, 16, 4, 1, tma=True, warp_specialize=True)
    out, lse = flash_attn_forward(q, k, v, causal=causal, scale=0.125, key_padding_mask=None, config=ws)
    assert_fa2_rule(out, q, k, v, causal=causal)
    plain, plain_lse = flash_attn_forward_tma(q, k, v, causal=causal, scale=0.125, config=TMA_TILES)
    torch.testing.assert_close(out, plain, atol=1e-3, rtol=0)
    torch.testing.assert_close(lse, plain_lse, atol=1e-4, rtol=0)
    assert (TMA_TILES.block_m, TMA_TILES.block_n, 64, causal, 4, 1, True) in forward_tma.COMPILED


@pytest.mark.parametrize("heads_q,heads_k,head_dim", [(9, 3, 64), (8, 1, 128), (4, 4, 128)])
def test_gqa_and_head_dims(heads_q, heads_k, head_dim, device, poison_empty):
    q, k, v = random_qkv(1, heads_q, heads_k, 45, 50, head_dim, torch.float16, device)
    out, _ = flash_attn_forward_tma(q, k, v, causal=True, scale=head_dim ** -0.5, config=TMA_TILES)
    assert_fa2_rule(out, q, k, v, causal=True)


def test_only_plain_descriptor_legal_calls_are_eligible():
    q, k, v = random_qkv(1, 2, 2, 16, 16, 64, torch.float16)
    assert tma_eligible(q, k, v, plain=True)
    assert not tma_eligible(q, k, v, plain=False)  # masks, segments, seqused_k, dropout or splits
    assert not tma_eligible(q.float(), k.float(), v.float(), plain=True)
    assert not tma_eligible(*random_qkv(1, 2, 2, 16, 16, 96, torch.float16), plain=True)  # head dim
    padded = torch.randn(1, 2, 16, 68, dtype=torch.float16)[..., :64]  # rows 136 bytes apart: not 16-aligned
    assert not tma_eligible(padded, k, v, plain=True)
    shifted = torch.randn(1 * 2 * 16 * 64 + 1, dtype=torch.float16)[1:].view(1, 2, 16, 64)  # base off by 2 bytes
    assert not tma_eligible(shifted, k, v, plain=True)


def test_forward_with_a_tma_config_serves_masked_calls_with_the_pointer_kernel(monkeypatch, device, poison_empty):
    called = []
    monkeypatch.setattr("flashpatch.kernels.forward.flash_attn_forward_tma",
                        lambda *a, **kw: called.append(1) or flash_attn_forward_tma(*a, **kw))
    q, k, v = random_qkv(2, 4, 2, 30, 30, 64, torch.float16, device)
    mask = torch.rand(2, 30, device=device) > 0.3
    mask[:, -1] = True
    out, _ = flash_attn_forward(q, k, v, causal=True, scale=0.125, key_padding_mask=mask, config=TMA_TILES)
    assert not called
    assert_fa2_rule(out, q, k, v, causal=True, scale=0.125, key_padding_mask=mask)
    flash_attn_forward(q, k, v, causal=True, scale=0.125, key_padding_mask=None, config=TMA_TILES)
    assert called == [1]
    assert forward_tma.COMPILED  # launches are recorded for inspection
