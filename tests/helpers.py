"""Shared checks: FA2's pass rule against a float64 reference."""

import torch

from flashpatch.reference import reference_attention

# Slack on top of FA2's 2x rule, for cases where torch's own error happens to be tiny.
EPS = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def random_qkv(batch, heads_q, heads_k, seq_q, seq_k, head_dim, dtype, device="cpu"):
    q = torch.randn(batch, heads_q, seq_q, head_dim, dtype=dtype, device=device)
    k = torch.randn(batch, heads_k, seq_k, head_dim, dtype=dtype, device=device)
    v = torch.randn(batch, heads_k, seq_k, head_dim, dtype=dtype, device=device)
    return q, k, v


def assert_fa2_rule(out, q, k, v, **kw):
    """|out - ref64| <= 2 * |torch same-dtype - ref64| + eps, and nothing non-finite. kw: reference_attention's
    (causal, scale, key_padding_mask, seqused_k, segment_ids, window, softcap, sinks); sinks go to float64 for
    the reference and stay as given (cast to q's dtype inside) for torch's same-dtype result."""
    assert torch.isfinite(out).all(), "output has NaN/Inf (unwritten or broken rows)"
    kw64 = dict(kw)
    if kw.get("sinks") is not None:
        kw64["sinks"] = kw["sinks"].double()
    ref64 = reference_attention(q.double(), k.double(), v.double(), **kw64)
    ref_same = reference_attention(q, k, v, **kw)
    err = (out.double() - ref64).abs().max().item()
    torch_err = (ref_same.double() - ref64).abs().max().item()
    assert err <= 2 * torch_err + EPS[q.dtype], f"error {err:.3g} vs torch's own {torch_err:.3g}"
    return err, torch_err
