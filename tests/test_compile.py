"""flashpatch.attention under torch.compile(fullgraph=True): traced as custom ops, no graph break."""

import torch

import flashpatch
from helpers import random_qkv


def test_fullgraph_forward_and_backward_match_eager(device):
    torch._dynamo.reset()
    q, k, v = (t.requires_grad_() for t in random_qkv(2, 4, 2, 21, 33, 32, torch.float32, device))
    mask = torch.rand(2, 33, device=device) > 0.2

    def layer(q, k, v):
        return (flashpatch.attention(q, k, v, causal=True, key_padding_mask=mask) * 2).sum(-1)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    expected = layer(q, k, v)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_ops_are_registered_with_fake_implementations():
    q, k, v = random_qkv(1, 2, 1, 5, 7, 16, torch.float16, "meta")
    out, lse = torch.ops.flashpatch.attention_fwd(q, k, v, True, 0.25, None, 0.0, 0)
    assert out.shape == q.shape and out.device.type == "meta" and lse.dtype == torch.float32
    dq, dk, dv, dsinks = torch.ops.flashpatch.attention_bwd(out, q, k, v, out, lse, True, 0.25, None, 0.0, 0)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape and dsinks.numel() == 0
    sinks = torch.zeros(2, device="meta")
    out, lse = torch.ops.flashpatch.attention_fwd(q, k, v, True, 0.25, None, 0.0, 0, None, None, 3, 0, 5.0, sinks)
    *_, dsinks = torch.ops.flashpatch.attention_bwd(out, q, k, v, out, lse, True, 0.25, None, 0.0, 0, None, 3, 0,
                                                    5.0, sinks)
    assert out.shape == q.shape and dsinks.shape == sinks.shape


def test_fullgraph_with_window_softcap_and_sinks_matches_eager(device):
    """The window, softcap and sinks travel through the custom ops (two ints, a float, a tensor); the sinks'
    gradient comes back through them."""
    torch._dynamo.reset()
    q, k, v = (t.requires_grad_() for t in random_qkv(2, 4, 2, 21, 33, 32, torch.float32, device))
    sinks = torch.randn(4, device=device, requires_grad=True)

    def layer(q, k, v, sinks):
        return flashpatch.attention(q, k, v, causal=True, window=(6, 0), softcap=4.0, sinks=sinks).sum(-1)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, sinks)
    expected = layer(q, k, v, sinks)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, sinks), grad)
    want = torch.autograd.grad(expected, (q, k, v, sinks), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
