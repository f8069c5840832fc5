"""The FP8 (e4m3) forward against float64: within FP8's precision, exact structure (masks, GQA, empty rows).

Per-tensor e4m3 inputs alone put outputs ~5 % (rms) from exact attention on unit-normal data (emulated in float64
and measured on an H100). So the kernel is held tightly to the attention
of its own dequantized inputs, where only the rounding of P to e4m3 remains (~2 % rms), and loosely to exact
attention. In Triton's CPU interpreter the kernels round onto e4m3's grid before casting (its own cast drops
carries), ties away from zero instead of to even: the same bounds hold on both.
"""

import pytest
import torch

import flashpatch
from flashpatch import AttentionInputError
from flashpatch.kernels import quantize_per_tensor
from flashpatch.reference import reference_attention
from helpers import random_qkv

TO_DEQUANTIZED = 0.035  # rms error / rms of the output
TO_EXACT = 0.08
SLOPE = 0.01  # |least-squares gain of out on the reference - 1|: a scale off by a percent shows here
ROW_REL = 0.15  # each row's rms error / its own output's rms (at least the overall one): one broken row shows


def dequantized(t):
    t8, descale = quantize_per_tensor(t)
    return t8.double() * descale.double()


def check_fp8(out, q, k, v, causal, scale=None):
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    exact = reference_attention(q.double(), k.double(), v.double(), causal=causal, scale=scale)
    ref = reference_attention(dequantized(q), dequantized(k), dequantized(v), causal=causal, scale=scale)
    rms = ref.pow(2).mean().sqrt()
    err = out.double() - ref
    assert err.pow(2).mean().sqrt() <= TO_DEQUANTIZED * rms
    assert (out.double() - exact).pow(2).mean().sqrt() <= TO_EXACT * rms
    gain = (out.double() * ref).sum() / ref.pow(2).sum()
    assert abs(gain - 1) <= SLOPE
    row_scale = ref.pow(2).mean(-1).sqrt().clamp_min(rms)
    assert (err.pow(2).mean(-1).sqrt() <= ROW_REL * row_scale).all()  # catches one broken row
    return (err.pow(2).mean().sqrt() / rms).item()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q,seq_k", [(1, 1), (40, 40), (33, 70), (70, 33), (5, 64)])
def test_matches_float64_within_fp8_precision(seq_q, seq_k, causal, device, poison_empty):
    q, k, v = random_qkv(2, 4, 2, seq_q, seq_k, 64, torch.float16, device)
    out = flashpatch.attention_fp8(q, k, v, causal=causal)
    check_fp8(out, q, k, v, causal)
    if causal and seq_q > seq_k:  # bottom-right alignment: the first rows see no key and return zeros
        assert (out[:, :, : seq_q - seq_k] == 0).all()


@pytest.mark.parametrize("heads_q,heads_k,head_dim,dtype", [(9, 3, 64, torch.bfloat16), (8, 1, 128, torch.float16),
                                                            (4, 4, 128, torch.bfloat16)])
def test_gqa_head_dims_and_dtypes(heads_q, heads_k, head_dim, dtype, device, poison_empty):
    q, k, v = random_qkv(1, heads_q, heads_k, 45, 50, head_dim, dtype, device)
    out = flashpatch.attention_fp8(q, k, v, causal=True)
    check_fp8(out, q, k, v, True)


def test_scale_and_large_inputs_use_the_per_tensor_descales(device):
    """Inputs far from unit range (amax ~ 300 and ~ 0.01): the descales carry the range, not the e4m3 bits."""
    q, k, v = random_qkv(1, 2, 2, 48, 48, 64, torch.float16, device)
    q, k, v = q * 40, k * 0.01, v * 300
    check_fp8(flashpatch.attention_fp8(q, k, v, scale=0.3), q, k, v, False, scale=0.3)


def test_quantize_per_tensor_maps_amax_to_448_and_transposes(device):
    t = torch.randn(2, 3, 20, 64, device=device) * torch.rand((), device=device) * 10
    t8, descale = quantize_per_tensor(t)
    assert t8.dtype == torch.float8_e4m3fn and descale.shape == (1,) and descale.dtype == torch.float32
    assert t8.float().abs().max() == 448
    back = t8.float() * descale
    assert ((back - t).abs() <= t.abs() / 16 + descale * 2 ** -9).all()  # e4m3: half a step of 3 mantissa bits
    vt8, _ = quantize_per_tensor(t, transpose=True)
    assert vt8.shape == (2, 3, 64, 20) and vt8.is_contiguous() and torch.equal(vt8.transpose(-1, -2).float(), t8.float())


def test_bad_inputs_name_the_problem():
    q, k, v = random_qkv(1, 2, 2, 16, 16, 64, torch.float16)
    with pytest.raises(AttentionInputError, match="16-bit"):
        flashpatch.attention_fp8(q.float(), k.float(), v.float())
    with pytest.raises(AttentionInputError, match="head_dim 64 or 128"):
        flashpatch.attention_fp8(*random_qkv(1, 2, 2, 16, 16, 96, torch.float16))
    with pytest.raises(AttentionInputError, match="inference only"):
        flashpatch.attention_fp8(q.requires_grad_(), k, v)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_every_candidate_fits_and_is_accurate(head_dim, causal):
    """On Hopper: each FP8 tile candidate compiles within sm90's shared memory and stays within FP8's precision,
    at a length that crosses many blocks and a ragged tail; and the op (autotuned) does too."""
    from flashpatch.kernels import flash_attn_forward_fp8, fp8_candidates
    from flashpatch.kernels.forward_fp8 import _flash_fwd_fp8_kernel
    from test_dispatch import SMEM

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("FP8 forward is for Hopper")
    q, k, v = random_qkv(2, 8, 2, 1000, 1000, head_dim, torch.bfloat16, "cuda")
    quantized = [quantize_per_tensor(q), quantize_per_tensor(k), quantize_per_tensor(v, transpose=True)]
    descale = torch.cat([d for _, d in quantized])
    for cfg in fp8_candidates("sm90", head_dim):
        out = flash_attn_forward_fp8(*(t for t, _ in quantized), descale, causal=causal, scale=head_dim ** -0.5,
                                     config=cfg)
        check_fp8(out, q, k, v, causal)
    with torch.no_grad():
        check_fp8(flashpatch.attention_fp8(q, k, v, causal=causal), q, k, v, causal)
    shared = [c.metadata.shared for c in _flash_fwd_fp8_kernel.device_caches[0][0].values()]
    assert shared and max(shared) <= SMEM["sm90"]
