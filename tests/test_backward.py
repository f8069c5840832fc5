"""Triton backward (dQ, dK, dV) against float64 autograd through the reference attention."""

import functools

import pytest
import torch

import flashpatch
from flashpatch import ops
from flashpatch.reference import reference_attention, visibility_mask
from helpers import EPS, grads_given_stored_out, random_qkv


@pytest.fixture(autouse=True)
def no_reference_fallback(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the PyTorch fallback ran instead of the Triton backward")

    monkeypatch.setattr(ops, "_reference_backward", refuse)


def grads(fn, q, k, v, grad_out, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    fn(*leaves, **kw).backward(grad_out)
    return [t.grad for t in leaves]


def check(q, k, v, reference=reference_attention, ours_kw=None, extreme=False, **kw):
    """FA2's rule for dq, dk, dv: flashpatch.attention(**kw, **ours_kw) against `reference(**kw)` in float64, the
    slack twice `reference`'s own error in the inputs' dtype. extreme (scores of magnitude 10 to 200): the slack is
    twice the larger of that and the error of the backward's own inputs (`stored_inputs_error`)."""
    grad_out = torch.randn_like(q)
    ours = grads(flashpatch.attention, q, k, v, grad_out, **kw, **(ours_kw or {}))
    ref64 = grads(reference, q.double(), k.double(), v.double(), grad_out.double(), **kw)
    same = grads(reference, q, k, v, grad_out, **kw)  # torch's own same-dtype math
    floors = stored_inputs_error(q, k, v, grad_out, ref64, reference, **kw) if extreme else [0.0] * 3
    for name, g, r, s, floor in zip("qkv", ours, ref64, same, floors):
        assert torch.isfinite(g).all(), f"d{name} has NaN/Inf"
        err = (g.double() - r).abs().max().item()
        torch_err = (s.double() - r).abs().max().item()
        assert err <= 2 * max(torch_err, floor) + 10 * EPS[q.dtype], \
            f"d{name}: error {err:.3g} vs torch's {torch_err:.3g}, stored inputs' {floor:.3g}"


def stored_inputs_error(q, k, v, grad_out, ref64, reference, **kw):
    """How far from float64 each of dq, dk, dv is put by what a flash-attention backward (FA2's too) starts from, the
    forward's stored out and lse, before any rounding of its own:
    - delta = rowsum(dO * out) takes out as stored, in q's dtype: the float64 gradients given that out differ from
      ref64 (dS = P * (dP - delta) no longer sums to 0 over a row), by about as much as torch's own 16-bit error,
      so its 2x alone is no bound;
    - P = exp2(s * log2(e) - lse * log2(e)) from float32 scores and lse: a relative error of a few float32 ulps of
      the largest |s| in log2 units (torch's exp(s - max) is exact at the row's max), which passes torch's float32
      error once |s| is large; allowed for as 8 such ulps of the largest gradient."""
    grads64, scores = grads_given_stored_out(q, k, v, grad_out, reference, **kw)
    # Relative to the largest of the three gradients: dq and dk come out of sums whose terms are far larger than the
    # result (they cancel exactly where a row sees one key), so their own size is no measure. Invisible scores are
    # -inf: the largest |s| is that of the visible ones.
    largest = scores[scores.isfinite()].abs().max().item() if scores.isfinite().any() else 0.0
    exponent = 8 * 2.0**-24 * largest * 1.4426950408889634
    magnitude = max(r.abs().max().item() for r in ref64)
    return [max((g - r).abs().max().item(), exponent * magnitude) for g, r in zip(grads64, ref64)]


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


# Ragged tails with extreme scores. A key past seq_k loads K = 0, so its score is 0 and, unmasked, its P would be
# exp(-lse): where a row's scores are all very negative that overflows (float16 dS from lse < -11, float32 P from
# lse < -88) and meets K = 0 in dS @ K as inf * 0 = NaN. The interpreter's tiles (kernels/config.py) are 16 and 32
# keys, so these lengths put the last key block short in both kernels, or make it the only one.
RAGGED = [1, 2, 3, 5, 17, 33]


@pytest.fixture
def fresh_seed():
    """New random inputs every run; the seed is printed, so a failure's captured output names it."""
    seed = torch.seed() % 2**31
    torch.manual_seed(seed)
    print(f"torch.manual_seed({seed})")
    return seed


def extreme_qkv(batch, heads_q, heads_k, seq_q, seq_k, head_dim, dtype, device, scores):
    """q, k, v whose scaled scores are huge. "fa2": flash-attn's overflow test (q * 5, k and v * 3: scores of
    standard deviation 15, so short rows are often all below -11); "negative" / "positive": every score near
    -120 / +120 (q and k share a large component along one direction, of opposite / equal sign)."""
    q, k, v = random_qkv(batch, heads_q, heads_k, seq_q, seq_k, head_dim, torch.float32, device)
    if scores == "fa2":
        q, k, v = q * 5, k * 3, v * 3
    else:
        shift = (120 / head_dim ** 0.5) ** 0.5  # added to every component: |q . k| * scale is about 120
        q = q + shift
        k = k + (shift if scores == "positive" else -shift)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("scores", ["fa2", "negative", "positive"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq", RAGGED)
def test_ragged_keys_with_extreme_scores(seq, causal, dtype, scores, device, fresh_seed, poison_empty):
    check(*extreme_qkv(2, 2, 1, seq, seq, 64, dtype, device, scores), causal=causal, extreme=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q,seq_k", [(19, 1), (40, 3), (5, 17), (33, 2), (3, 33), (7, 48)])
def test_ragged_keys_with_extreme_scores_sq_ne_sk(seq_q, seq_k, causal, dtype, device, fresh_seed, poison_empty):
    """flash-attn's varlen overflow case (many queries, one to three keys), Sk = 48 (whole dK/dV key blocks, a ragged
    dQ one) and GQA groups of 3."""
    for heads_q, heads_k in ((6, 2), (3, 1)):
        check(*extreme_qkv(1, heads_q, heads_k, seq_q, seq_k, 32, dtype, device, "negative"), causal=causal,
              extreme=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq", [3, 17, 33])
def test_ragged_keys_with_extreme_scores_padding_and_segments(seq, causal, dtype, device, fresh_seed, poison_empty):
    from test_packed import packed_segments

    q, k, v = extreme_qkv(3, 2, 1, seq, seq, 64, dtype, device, "negative")
    mask = torch.rand(3, seq, device=device) > 0.3
    mask[1] = False  # a sequence with no visible key: its rows have no gradient
    mask[2, -1] = False  # a padded key in the ragged last block
    check(q, k, v, causal=causal, key_padding_mask=mask, extreme=True)
    check(q, k, v, causal=causal, segment_ids=packed_segments(3, seq, device), extreme=True)


def kernel_keep_mask(batch, heads_q, seq_q, seq_k, seed, p, device):
    """The kernels' dropout keep mask [B, Hq, Sq, Sk] (a function of seed and position only), read back through the
    forward with q = k = 0 and V = I: out[i, j] = keep_ij / (Sk (1 - p))."""
    head_dim = 64
    assert seq_k <= head_dim
    q = torch.zeros(batch, heads_q, seq_q, head_dim, device=device)
    kv = torch.zeros(batch, 1, seq_k, head_dim, device=device)
    v = kv.clone()
    v[:, :, torch.arange(seq_k), torch.arange(seq_k)] = 1.0
    return flashpatch.attention(q, kv, v, dropout_p=p, seed=seed)[..., :seq_k] > 0


def dropout_reference(q, k, v, *, keep, p, causal):
    """reference_attention's probabilities, dropped by `keep` and rescaled by 1 / (1 - p), applied to V."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    mask = visibility_mask(q.shape[2], k.shape[2], causal=causal, key_padding_mask=None, device=q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, -1)
    if mask is not None:
        probs = probs.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return (probs * keep.to(q.dtype) / (1 - p)) @ v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q,seq_k", [(2, 2), (9, 5), (17, 17), (6, 33)])
def test_ragged_keys_with_extreme_scores_and_dropout(seq_q, seq_k, causal, dtype, device, fresh_seed, poison_empty):
    p, seed = 0.3, int(torch.randint(0, 2**30, ()))
    keep = kernel_keep_mask(2, 2, seq_q, seq_k, seed, p, device)
    check(*extreme_qkv(2, 2, 1, seq_q, seq_k, 64, dtype, device, "negative"),
          reference=functools.partial(dropout_reference, keep=keep, p=p), ours_kw=dict(dropout_p=p, seed=seed),
          causal=causal, extreme=True)


# On the GPU: the same family in bf16 and fp16 at the real tiles (kernels/config.py's sm90 rows: 32 to 128 keys per
# block), shaped as flash-attn's overflow tests: batch 2, 5 heads, q * 5, k and v * 3, Sq == Sk.
@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seq", [2, 5, 17, 128, 200])
def test_gpu_bf16_ragged_keys_with_extreme_scores(seq, causal, fresh_seed):
    check(*extreme_qkv(2, 5, 5, seq, seq, 128, torch.bfloat16, "cuda", "fa2"), causal=causal, extreme=True)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
@pytest.mark.parametrize("seq", [1, 2, 5, 17, 128])
def test_gpu_fp16_ragged_keys_with_extreme_scores(seq, head_dim, causal, fresh_seed):
    check(*extreme_qkv(2, 5, 5, seq, seq, head_dim, torch.float16, "cuda", "fa2"), causal=causal, extreme=True)
    check(*extreme_qkv(2, 6, 2, seq, seq, head_dim, torch.float16, "cuda", "negative"), causal=causal, extreme=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_varlen_overflow_shapes(dtype, causal, fresh_seed):
    """flash-attn's varlen overflow test (sequences of 1, 2 and 3 keys under many queries), as key padding: 146
    queries over 3 keys, of which each sequence sees 1, 2 or 3."""
    q, k, v = extreme_qkv(3, 5, 5, 146, 3, 128, dtype, "cuda", "negative")
    mask = torch.arange(3, device="cuda")[None] < torch.tensor([1, 2, 3], device="cuda")[:, None]
    check(q, k, v, causal=causal, key_padding_mask=mask, extreme=True)
