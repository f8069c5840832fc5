"""flashpatch.attention against a float64 reference (Triton interpreter on CPU, real GPU with CUDA)."""

import os
import subprocess
import sys

import pytest
import torch

import flashpatch
from flashpatch import AttentionInputError
from flashpatch.reference import reference_attention
from helpers import assert_fa2_rule, random_qkv

DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q,seq_k", [(1, 1), (17, 17), (63, 65), (65, 63), (200, 200), (1, 200), (17, 63), (5, 3)])
def test_lengths(seq_q, seq_k, causal, dtype, device, poison_empty):
    q, k, v = random_qkv(2, 4, 2, seq_q, seq_k, 64, dtype, device)
    out = flashpatch.attention(q, k, v, causal=causal)
    assert out.shape == q.shape
    assert_fa2_rule(out, q, k, v, causal=causal)


@pytest.mark.parametrize("head_dim", [8, 16, 32, 40, 64, 80, 96, 128, 160, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_head_dims(head_dim, dtype, device, poison_empty):
    q, k, v = random_qkv(1, 2, 1, 33, 47, head_dim, dtype, device)
    out = flashpatch.attention(q, k, v, causal=True)
    assert_fa2_rule(out, q, k, v, causal=True)


@pytest.mark.parametrize("heads_q,heads_k", [(9, 3), (32, 8), (8, 1), (6, 6)])
def test_gqa_and_mqa(heads_q, heads_k, device, poison_empty):
    q, k, v = random_qkv(1, heads_q, heads_k, 19, 40, 32, torch.float16, device)
    out = flashpatch.attention(q, k, v, causal=True)
    assert_fa2_rule(out, q, k, v, causal=True)


def _padding(batch, seq_k, side):
    lengths = torch.randint(1, seq_k + 1, (batch,))
    pos = torch.arange(seq_k)[None, :]
    mask = pos >= (seq_k - lengths[:, None]) if side == "left" else pos < lengths[:, None]
    return mask


@pytest.mark.parametrize("side", ["left", "right", "random"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_key_padding(side, causal, dtype, device, poison_empty):
    batch, seq_q, seq_k = 3, 23, 37
    mask = torch.rand(batch, seq_k) > 0.4 if side == "random" else _padding(batch, seq_k, side)
    mask = mask.to(device)
    q, k, v = random_qkv(batch, 4, 2, seq_q, seq_k, 64, dtype, device)
    out = flashpatch.attention(q, k, v, causal=causal, key_padding_mask=mask)
    assert_fa2_rule(out, q, k, v, causal=causal, key_padding_mask=mask)


def test_rows_without_keys_are_zero(device, poison_empty):
    q, k, v = random_qkv(2, 2, 2, 9, 40, 64, torch.float32, device)
    mask = torch.ones(2, 40, dtype=torch.bool, device=device)
    mask[1] = False  # the second sequence has no visible key at all
    out = flashpatch.attention(q, k, v, key_padding_mask=mask)
    assert torch.isfinite(out).all()
    assert out[1].abs().max() == 0
    # causal with Sq > Sk: the first Sq - Sk queries see nothing
    q, k, v = random_qkv(1, 2, 2, 30, 10, 64, torch.float32, device)
    out = flashpatch.attention(q, k, v, causal=True)
    assert out[:, :, :20].abs().max() == 0
    assert_fa2_rule(out, q, k, v, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(dtype, device, poison_empty):
    # transformers hands over [B, S, H, D] projections transposed to [B, H, S, D]
    q = torch.randn(2, 31, 4, 64, dtype=dtype, device=device).transpose(1, 2)
    kv = torch.randn(2, 45, 2, 2, 64, dtype=dtype, device=device)  # fused k/v buffer
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    strided = torch.randn(2, 4, 31, 128, dtype=dtype, device=device)[..., ::2]  # stride 2 along head_dim
    for qq in (q, strided):
        out = flashpatch.attention(qq, k, v, causal=True)
        assert_fa2_rule(out, qq, k, v, causal=True)


def test_lse_matches_logsumexp(device):
    q, k, v = random_qkv(1, 3, 3, 21, 34, 64, torch.float32, device)
    mask = torch.rand(1, 34, device=device) > 0.3
    _, lse = torch.ops.flashpatch.attention_fwd(q, k, v, True, 0.125, mask, 0.0, 0)
    scores = (q.double() @ k.double().transpose(-1, -2)) * 0.125
    visible = torch.ones(21, 34, dtype=torch.bool, device=device).tril(34 - 21) & mask[:, None, None, :]
    ref = torch.logsumexp(scores.masked_fill(~visible, float("-inf")), -1)
    torch.testing.assert_close(lse.double(), ref, rtol=1e-5, atol=1e-5)


def test_custom_scale(device):
    q, k, v = random_qkv(1, 2, 2, 16, 16, 64, torch.float32, device)
    scale = torch.rand(()).item() + 0.05
    out = flashpatch.attention(q, k, v, scale=scale)
    assert_fa2_rule(out, q, k, v, scale=scale)


def test_backward_matches_float64(device):
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 4, 2, 13, 21, 32, torch.float32, device))
    grad = torch.randn(1, 4, 13, 32, device=device)
    flashpatch.attention(q, k, v, causal=True).backward(grad)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    reference_attention(*leaves, causal=True).backward(grad.double())
    for ours, ref in zip((q, k, v), leaves):
        torch.testing.assert_close(ours.grad.double(), ref.grad, rtol=1e-4, atol=1e-5)


def test_reference_matches_sdpa():
    """The yardstick itself agrees with PyTorch's SDPA (top-left aligned when Sq == Sk)."""
    q, k, v = random_qkv(2, 4, 4, 12, 12, 16, torch.float64)
    mask = torch.rand(2, 12) > 0.3
    mask[:, 0] = True
    ours = reference_attention(q, k, v, causal=True, key_padding_mask=mask)
    dense = torch.ones(12, 12, dtype=torch.bool).tril() & mask[:, None, None, :]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize(
    "shapes,kwargs,match",
    [
        (((1, 4, 8, 64), (1, 3, 8, 64), (1, 3, 8, 64)), {}, "multiple of key/value heads"),
        (((1, 4, 8, 64), (1, 4, 8, 32), (1, 4, 8, 32)), {}, "disagree on batch or head_dim"),
        (((1, 4, 8, 64), (1, 4, 8, 64), (1, 4, 9, 64)), {}, "same shape"),
        (((1, 4, 8, 60), (1, 4, 8, 60), (1, 4, 8, 60)), {}, "head_dim 60"),
        (((1, 4, 8, 264), (1, 4, 8, 264), (1, 4, 8, 264)), {}, "head_dim 264"),
        (((4, 8, 64), (1, 4, 8, 64), (1, 4, 8, 64)), {}, "4-D"),
        (((1, 4, 8, 64), (1, 4, 8, 64), (1, 4, 8, 64)), {"key_padding_mask": torch.ones(1, 7, dtype=torch.bool)},
         "key_padding_mask"),
        (((1, 4, 8, 64), (1, 4, 8, 64), (1, 4, 8, 64)), {"key_padding_mask": torch.ones(1, 8)}, "bool"),
    ],
)
def test_bad_input_is_named(shapes, kwargs, match):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(AttentionInputError, match=match):
        flashpatch.attention(q, k, v, **kwargs)


def test_dtype_mismatch_and_unsupported_dtype():
    q = torch.randn(1, 2, 4, 64)
    with pytest.raises(AttentionInputError, match="dtypes differ"):
        flashpatch.attention(q, q.half(), q.half())
    with pytest.raises(AttentionInputError, match="not supported"):
        flashpatch.attention(q.double(), q.double(), q.double())


def test_device_mismatch():
    q = torch.randn(1, 2, 4, 64)
    with pytest.raises(AttentionInputError, match="different devices"):
        flashpatch.attention(q, q.to("meta"), q)


def test_cpu_without_interpreter_says_what_to_do(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    code = ("import torch, flashpatch\n"
            "q = torch.randn(1, 2, 4, 64)\n"
            "try:\n    flashpatch.attention(q, q, q)\n"
            "except flashpatch.AttentionInputError as e:\n    print('ERR', e)\n")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ERR" in res.stdout, res.stderr
    assert "scaled_dot_product_attention" in res.stdout and "TRITON_INTERPRET=1" in res.stdout


@pytest.mark.parametrize("num_splits", [2, 3, 5])
@pytest.mark.parametrize("seq_q,seq_k,causal", [(1, 200, True), (4, 97, True), (16, 64, False), (3, 2, True)])
def test_split_kv_matches_reference(num_splits, seq_q, seq_k, causal, device, poison_empty):
    from flashpatch.dispatch import path_for_device
    from flashpatch.kernels import flash_attn_forward, select_config

    q, k, v = random_qkv(2, 4, 2, seq_q, seq_k, 64, torch.float16, device)
    mask = torch.rand(2, seq_k, device=device) > 0.2
    mask[1, : seq_k // 2] = False  # left padding: some splits see no key at all
    config = select_config(path_for_device(q.device).family, 64, seq_q)
    out, lse = flash_attn_forward(q, k, v, causal=causal, scale=0.125, key_padding_mask=mask, config=config,
                                  num_splits=num_splits)
    assert_fa2_rule(out, q, k, v, causal=causal, scale=0.125, key_padding_mask=mask)
    _, lse_one = flash_attn_forward(q, k, v, causal=causal, scale=0.125, key_padding_mask=mask, config=config)
    torch.testing.assert_close(lse, lse_one, rtol=1e-4, atol=1e-4)


def test_decode_takes_the_split_path():
    from flashpatch.kernels import decode_splits

    assert decode_splits(batch_heads=32, seq_q=1, seq_k=16384, block_n=64, sm_count=132) == 4  # 1 wave
    assert decode_splits(batch_heads=32, seq_q=1, seq_k=4096, block_n=64, sm_count=132) == 4
    assert decode_splits(batch_heads=32, seq_q=1, seq_k=16384, block_n=64, sm_count=132, waves=4) == 16
    assert decode_splits(batch_heads=32, seq_q=1, seq_k=640, block_n=64, sm_count=132) == 4
    assert decode_splits(batch_heads=32, seq_q=1, seq_k=200, block_n=64, sm_count=132) == 1  # 2 blocks each
    assert decode_splits(batch_heads=32, seq_q=1, seq_k=1024, block_n=128, sm_count=132, min_blocks=8) == 1
    assert decode_splits(batch_heads=512, seq_q=1, seq_k=16384, block_n=64, sm_count=132) == 1
    assert decode_splits(batch_heads=32, seq_q=1024, seq_k=16384, block_n=64, sm_count=132) == 1
    assert decode_splits(batch_heads=4, seq_q=1, seq_k=100, block_n=64, sm_count=132) == 1
    assert decode_splits(batch_heads=1, seq_q=1, seq_k=1 << 20, block_n=64, sm_count=132) == 64


def test_planned_prefill_binds_each_calls_tensors_and_rechecks_what_the_plan_does_not_fix(device, monkeypatch,
                                                                                           poison_empty):
    """Inference prefill calls of one kind (a model's layers) share a ForwardPlan, validated once: each call's
    tensors, masks and K/V strides are its own, a new key length or layout gets a plan of its own, and a call the
    plan can't take still gets the general path's error."""
    from flashpatch import ops
    from flashpatch.kernels import ForwardPlan
    from flashpatch.kernels.plans import PLANS

    ops.reset_caches()
    validated = []
    real_check = ops.check_inputs
    monkeypatch.setattr(ops, "check_inputs", lambda *a: validated.append(a) or real_check(*a))
    for strided_kv in (False, True, False):
        q, k, v = random_qkv(2, 4, 2, 40, 40, 64, torch.float16, device)
        if strided_kv:  # [B, S, H, D] memory, as transformers' projections leave it
            k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
        mask = torch.rand(2, 40, device=device) > 0.3
        out = flashpatch.attention(q, k, v, causal=True, key_padding_mask=mask)
        assert_fa2_rule(out, q, k, v, causal=True, key_padding_mask=mask)
    assert len(validated) == 1
    (plan,) = PLANS.plans.values()
    assert isinstance(plan, ForwardPlan)

    _, k, v = random_qkv(2, 4, 2, 40, 57, 64, torch.float16, device)
    mask = torch.rand(2, 57, device=device) > 0.3
    out = flashpatch.attention(q, k, v, causal=True, key_padding_mask=mask)
    assert_fa2_rule(out, q, k, v, causal=True, key_padding_mask=mask)
    assert len(validated) == 2 and len(PLANS) == 2
    with pytest.raises(AttentionInputError, match="same shape"):
        flashpatch.attention(q, k, v[:, :, :-1], causal=True, key_padding_mask=mask)
    with pytest.raises(AttentionInputError, match="key_padding_mask must be"):
        flashpatch.attention(q, k, v, causal=True, key_padding_mask=mask[:, :-1])
    with torch.enable_grad():  # a training call is validated every time, and its plan keeps the lse
        q.requires_grad_()
        flashpatch.attention(q, k, v, causal=True, key_padding_mask=mask).sum().backward()
    assert q.grad is not None and len(validated) == 5 and len(PLANS) == 3


def test_autocast_casts_mixed_inputs_like_sdpa(device):
    """Under autocast (fp32 weights, lower-precision matmuls) RoPE leaves q and k in float32 and v in the autocast
    dtype: like SDPA, the op runs in the autocast dtype; gradients flow back in each input's own dtype."""
    dtype = torch.float16  # the interpreter cannot run bf16 dots
    q, k, v = random_qkv(2, 4, 2, 20, 20, 32, torch.float32, device)
    q, k, v = q.requires_grad_(), k.requires_grad_(), v.to(dtype).requires_grad_()
    with torch.autocast(device.type, dtype=dtype):
        out = flashpatch.attention(q, k, v, causal=True)
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert out.dtype == expected.dtype == dtype
    ref = reference_attention(q.double(), k.double(), v.double(), causal=True)
    assert (out.double() - ref).abs().max() <= 2 * (expected.double() - ref).abs().max() + 1e-3
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and v.grad.dtype == dtype and torch.isfinite(q.grad).all()


def test_double_backward_raises_instead_of_dropping_second_order_terms(device):
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 2, 2, 9, 9, 32, torch.float32, device))
    out = flashpatch.attention(q, k, v, causal=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(out.sum(), q, create_graph=True)  # else dq would silently not depend on q
