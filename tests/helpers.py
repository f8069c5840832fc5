"""Shared checks: FA2's pass rule against a float64 reference; layouts; compiling sm90 kernels without a GPU."""

import json
import os
import subprocess
import sys

import pytest
import torch

from flashpatch.reference import reference_attention, visibility_mask

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


def grads_given_stored_out(q, k, v, grad_out, reference=reference_attention, sinks=None, **kw):
    """The float64 gradients of q, k, v that a flash-attention backward (FA2's too) aims at, given the forward's out
    as it is stored, rounded to q's dtype: delta = rowsum(dO * out) then shifts by eps = rowsum(dO * (stored - out))
    per row, so dS = P * (dP - delta - eps) no longer sums to 0 over a row. Also returns the float64 scores the
    gradients come from (invisible ones -inf). kw: `reference`'s (causal, scale, key_padding_mask, segment_ids,
    window, softcap); sinks join each row's softmax. Rows that see nothing have no gradient."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    sink64 = sinks.detach().double() if sinks is not None else None
    out = reference(*leaves, **kw, **({"sinks": sink64} if sinks is not None else {}))
    dout = grad_out.double()
    eps = (dout * (out.detach().to(q.dtype).double() - out.detach())).sum(-1)  # delta's shift, per row
    group = q.shape[1] // k.shape[1]
    scores = (leaves[0] @ leaves[1].repeat_interleave(group, 1).transpose(-1, -2)) * (kw.get("scale") or
                                                                                     q.shape[-1] ** -0.5)
    if kw.get("softcap"):
        scores = kw["softcap"] * torch.tanh(scores / kw["softcap"])
    mask = visibility_mask(q.shape[2], k.shape[2], causal=kw.get("causal", False), device=q.device,
                           key_padding_mask=kw.get("key_padding_mask"), segment_ids=kw.get("segment_ids"),
                           window=kw.get("window"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if sink64 is not None:
        scores = torch.cat([scores, sink64[None, :, None, None].expand(*scores.shape[:-1], 1)], -1)
    empty = scores.isneginf().all(-1, keepdim=True)
    lse = torch.logsumexp(scores.masked_fill(empty, 0.0), -1) * ~empty[..., 0]  # empty rows: no gradient
    # d(lse_i)/dS_ij = P_ij: this loss gives dS = P * (dP - delta - eps), the gradients given the stored out.
    ((out * dout).sum() - (eps * lse).sum()).backward()
    return [t.grad for t in leaves], scores.detach()


HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def bshd(t):
    """The same values stored as [B, S, H, D] (as a projection leaves them) and viewed as [B, H, S, D]."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


# Errors that mean this Triton's Gluon API differs from the one the kernels are written for, not a broken kernel.
API_MISMATCH = ("ImportError", "ModuleNotFoundError", "AttributeError", "TypeError")


def compile_in_subprocess(script: str, cases) -> dict:
    """Runs `script` (argv[1]: the cases as JSON) outside the interpreter conftest turns on without CUDA and merges
    the JSON objects it prints, one line each; skips when it prints {"import_error": ...} (no Gluon here)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True, env=env,
                          timeout=1800)
    report = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            report.update(json.loads(line))
    if "import_error" in report:
        pytest.skip(f"cannot compile Gluon here: {report['import_error']}")
    if done.returncode != 0 and not report:
        pytest.fail(f"compile subprocess failed:\n{done.stderr[-3000:]}")
    return report


def compiled_row(report: dict, key: str) -> dict:
    """One case's row of `compile_in_subprocess`, failing on a compile error and skipping on a Gluon API mismatch."""
    import triton

    row = report.get(key)
    assert row is not None, "the compile subprocess stopped before this case"
    if "error" in row:
        if row["error_type"] in API_MISMATCH:
            pytest.skip(f"Triton {triton.__version__}: Gluon API mismatch: {row['error']}")
        pytest.fail(row["error"])
    return row
