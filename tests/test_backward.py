"""Triton backward (dQ, dK, dV) against float64 autograd through the reference attention."""

import pytest
import torch

import flashpatch
from flashpatch import ops
from flashpatch.reference import reference_attention
from helpers import EPS, random_qkv


@pytest.fixture(autouse=True)
def no_reference_fallback(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the PyTorch fallback ran instead of the Triton backward")

    monkeypatch.setattr(ops, "_reference_backward", refuse)


def grads(fn, q, k, v, grad_out, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    fn(*leaves, **kw).backward(grad_out)
    return [t.grad for t in leaves]


def check(q, k, v, **kw):
    grad_out = torch.randn_like(q)
    ours = grads(flashpatch.attention, q, k, v, grad_out, **kw)
    ref64 = grads(reference_attention, q.double(), k.double(), v.double(), grad_out.double(), **kw)
    same = grads(reference_attention, q, k, v, grad_out, **kw)  # torch's own same-dtype math
    for name, g, r, s in zip("qkv", ours, ref64, same):
        assert torch.isfinite(g).all(), f"d{name} has NaN/Inf"
        err = (g.double() - r).abs().max().item()
        torch_err = (s.double() - r).abs().max().item()
        assert err <= 2 * torch_err + 10 * EPS[q.dtype], f"d{name}: error {err:.3g} vs torch's {torch_err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q,seq_k", [(1, 1), (17, 17), (33, 65), (65, 33), (1, 50), (40, 40), (90, 110)])
def test_lengths(seq_q, seq_k, causal, dtype, device, poison_empty):
    check(*random_qkv(2, 4, 2, seq_q, seq_k, 64, dtype, device), causal=causal)


@pytest.mark.parametrize("heads_q,heads_k", [(9, 3), (8, 1), (4, 4)])
def test_gqa_sums_over_the_group(heads_q, heads_k, device, poison_empty):
    check(*random_qkv(1, heads_q, heads_k, 23, 31, 32, torch.float32, device), causal=True)


@pytest.mark.parametrize("head_dim", [16, 80, 128, 256])
def test_head_dims(head_dim, device, poison_empty):
    check(*random_qkv(1, 2, 1, 19, 27, head_dim, torch.float32, device), causal=True)


@pytest.mark.parametrize("side", ["left", "right", "random"])
@pytest.mark.parametrize("causal", [False, True])
def test_key_padding(side, causal, device, poison_empty):
    batch, seq_q, seq_k = 3, 21, 29
    pos = torch.arange(seq_k)[None]
    lengths = torch.tensor([29, 12, 1])[:, None]
    mask = {"left": pos >= seq_k - lengths, "right": pos < lengths, "random": torch.rand(batch, seq_k) > 0.4}[side]
    check(*random_qkv(batch, 4, 2, seq_q, seq_k, 64, torch.float32, device), causal=causal,
          key_padding_mask=mask.to(device))


def test_rows_without_keys_get_zero_gradient(device):
    q, k, v = random_qkv(2, 2, 2, 9, 12, 32, torch.float32, device)
    mask = torch.ones(2, 12, dtype=torch.bool, device=device)
    mask[1] = False
    dq, dk, dv = grads(flashpatch.attention, q, k, v, torch.randn_like(q), key_padding_mask=mask)
    assert dq[1].abs().max() == 0 and dk[1].abs().max() == 0 and dv[1].abs().max() == 0
    assert dq[0].abs().max() > 0


def test_non_contiguous_grad_and_inputs(device):
    q = torch.randn(2, 19, 4, 64, device=device).transpose(1, 2)
    k = torch.randn(2, 23, 2, 64, device=device).transpose(1, 2)
    v = torch.randn(2, 23, 2, 64, device=device).transpose(1, 2)
    check(q, k, v, causal=True)
