"""Attention dropout inside the kernels: a Philox mask from (seed, head, row, column), regenerated in backward."""

import pytest
import torch

import flashpatch
from flashpatch.reference import visibility_mask
from helpers import random_qkv

B, HQ, HK, SQ, SK, D = 2, 4, 2, 29, 45, 64  # SK <= D: the identity trick below reads the mask back


def kept(seed, p, device):
    """The kernels' keep mask [B, HQ, SQ, SK]: with q = k = 0 and V = I, out[i, j] = keep_ij / (SK (1 - p))."""
    q = torch.zeros(B, HQ, SQ, D, device=device)
    k = torch.zeros(B, HK, SK, D, device=device)
    v = torch.zeros(B, HK, SK, D, device=device)
    v[:, :, torch.arange(SK), torch.arange(SK)] = 1.0
    out = flashpatch.attention(q, k, v, dropout_p=p, seed=seed)
    return out[..., :SK] > 0


def reference(q, k, v, keep, p, causal):
    scores = (q @ k.repeat_interleave(HQ // HK, 1).transpose(-1, -2)) * D ** -0.5
    mask = visibility_mask(SQ, SK, causal=causal, key_padding_mask=None, device=q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, -1) * keep / (1 - p)
    return probs @ v.repeat_interleave(HQ // HK, 1)


def test_zero_dropout_is_no_dropout(device):
    q, k, v = random_qkv(B, HQ, HK, SQ, SK, D, torch.float32, device)
    assert torch.equal(flashpatch.attention(q, k, v, dropout_p=0.0, seed=5), flashpatch.attention(q, k, v))


def test_same_seed_same_mask_other_seed_other_mask(device):
    q, k, v = random_qkv(B, HQ, HK, SQ, SK, D, torch.float32, device)
    a = flashpatch.attention(q, k, v, dropout_p=0.3, seed=11)
    assert torch.equal(a, flashpatch.attention(q, k, v, dropout_p=0.3, seed=11))
    assert not torch.equal(a, flashpatch.attention(q, k, v, dropout_p=0.3, seed=12))
    torch.manual_seed(0)
    b = flashpatch.attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(0)
    assert torch.equal(b, flashpatch.attention(q, k, v, dropout_p=0.3))  # seed drawn from torch's generator


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_and_head_independence(p, device):
    keep = kept(7, p, device)
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 0.02, rate
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])


@pytest.mark.parametrize("causal", [False, True])
def test_forward_and_gradients_match_float64_with_the_same_mask(causal, device):
    p, seed = 0.25, 1234
    keep = kept(seed, p, device).double()
    q, k, v = (t.requires_grad_() for t in random_qkv(B, HQ, HK, SQ, SK, D, torch.float32, device))
    out = flashpatch.attention(q, k, v, causal=causal, dropout_p=p, seed=seed)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference(*leaves, keep, p, causal)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad.double())
    for ours, theirs in zip((q, k, v), leaves):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=1e-4, atol=1e-5)


def test_bad_dropout_is_named():
    q = torch.randn(1, 2, 4, 64)
    with pytest.raises(flashpatch.AttentionInputError, match="dropout_p"):
        flashpatch.attention(q, q, q, dropout_p=1.0)
