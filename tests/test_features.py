"""Sliding windows, tanh softcapping and attention sinks in the forward, backward and decode kernels, against the
float64 reference (flashpatch/reference.py), each alone and combined with causal, padding, GQA, KV caches and key
splits. Fresh random inputs every run (the seed is printed, so a failure's captured output names it)."""

import pytest
import torch
import triton
import triton.language as tl

import flashpatch
from flashpatch import AttentionInputError, ops
from flashpatch.kernels.online_softmax import tanh
from flashpatch.reference import reference_attention, visibility_mask
from helpers import EPS, assert_fa2_rule, grads_given_stored_out, random_qkv

DTYPES = [torch.float32, torch.float16]


@pytest.fixture(autouse=True)
def fresh_seed():
    seed = torch.seed() % 2**31
    torch.manual_seed(seed)
    print(f"torch.manual_seed({seed})")
    return seed


@pytest.fixture
def no_reference_fallback(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the PyTorch fallback ran instead of the Triton backward")

    monkeypatch.setattr(ops, "_reference_backward", refuse)


def sinks_for(heads, device, dtype=torch.float32):
    """Sink logits around the scores' size (gpt-oss' trained sinks sit near them), some large."""
    return (torch.randn(heads, device=device) * 2).to(dtype)


# (Sq, Sk, window): windows narrower than a key block (the interpreter's 16 keys) and wider, one-sided,
# longer than the sequence, Sq > Sk and Sq < Sk, odd lengths.
WINDOWS = [(37, 37, (3, 0)), (37, 37, (0, 0)), (45, 45, (20, 5)), (33, 61, (16, -1)), (61, 33, (7, 2)),
           (40, 40, (-1, 9)), (29, 29, (100, 100)), (1, 53, (10, 0)), (50, 17, (4, 4))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q,seq_k,window", WINDOWS)
def test_window_forward(seq_q, seq_k, window, causal, dtype, device, poison_empty):
    q, k, v = random_qkv(2, 4, 2, seq_q, seq_k, 32, dtype, device)
    out = flashpatch.attention(q, k, v, causal=causal, window=window)
    assert_fa2_rule(out, q, k, v, causal=causal, window=window)


def test_window_rows_without_keys_are_zero(device, poison_empty):
    """Causal with Sq > Sk: the first Sq - Sk rows' bands lie before the first key; they return zeros, as causal
    rows without keys do."""
    q, k, v = random_qkv(1, 2, 1, 40, 10, 32, torch.float32, device)
    out = flashpatch.attention(q, k, v, causal=True, window=(3, 0))
    assert out[:, :, :30].abs().max() == 0
    assert_fa2_rule(out, q, k, v, causal=True, window=(3, 0))


def test_window_matches_transformers_sliding_mask():
    """window (W - 1, 0) with causal is transformers' sliding_window_causal_mask_function(W)."""
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

    for seq_q, seq_k, w in ((9, 9, 4), (3, 11, 5), (1, 7, 3)):
        ours = visibility_mask(seq_q, seq_k, causal=True, key_padding_mask=None, device="cpu", window=(w - 1, 0))
        theirs = sdpa_mask(batch_size=1, q_length=seq_q, kv_length=seq_k, q_offset=seq_k - seq_q,
                           mask_function=sliding_window_causal_mask_function(w), allow_is_causal_skip=False)
        assert torch.equal(ours.expand_as(theirs), theirs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_window_with_padding_and_gqa(causal, dtype, device, poison_empty):
    batch, seq_q, seq_k = 3, 27, 45
    mask = torch.rand(batch, seq_k, device=device) > 0.3
    mask[1, :30] = False  # left padding longer than the window: rows whose band is all padding
    mask[2] = False
    for heads_q, heads_k in ((6, 2), (4, 1)):
        q, k, v = random_qkv(batch, heads_q, heads_k, seq_q, seq_k, 32, dtype, device)
        out = flashpatch.attention(q, k, v, causal=causal, key_padding_mask=mask, window=(9, 3))
        assert_fa2_rule(out, q, k, v, causal=causal, key_padding_mask=mask, window=(9, 3))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [0.5, 5.0, 50.0])
@pytest.mark.parametrize("causal", [False, True])
def test_softcap_forward(causal, softcap, dtype, device, poison_empty):
    q, k, v = random_qkv(2, 4, 2, 35, 47, 32, dtype, device)
    q = q * 3  # scores of several units, so that small caps bend them
    scale = 0.3
    out = flashpatch.attention(q, k, v, causal=causal, softcap=softcap, scale=scale)
    assert_fa2_rule(out, q, k, v, causal=causal, softcap=softcap, scale=scale)


def test_softcap_scale_comes_before_the_cap(device):
    """Gemma 2's order: softcap * tanh(scale * q.k / softcap), not scale * softcap * tanh(q.k / softcap)."""
    q, k, v = random_qkv(1, 2, 2, 16, 16, 32, torch.float32, device)
    out = flashpatch.attention(q * 4, k, v, softcap=2.0, scale=0.5)
    scores = 2.0 * torch.tanh((q * 4).double() @ k.double().transpose(-1, -2) * 0.5 / 2.0)
    expected = torch.softmax(scores, -1) @ v.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@triton.jit
def _tanh_kernel(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, tanh(tl.load(X + offs)))


def test_tanh_is_accurate_to_a_few_ulps(device):
    x = torch.cat([torch.linspace(-12, 12, 4096), torch.logspace(-8, 0, 1024), -torch.logspace(-8, 0, 1024),
                   torch.tensor([0.0, 0.2499, 0.25, 0.2501])])
    x = torch.cat([x, torch.zeros(8192 - x.numel())]).to(device)
    y = torch.empty_like(x)
    _tanh_kernel[(1,)](x, y, N=x.numel())
    ref = torch.tanh(x.double())
    ulp = torch.finfo(torch.float32).eps * ref.abs().clamp(min=torch.finfo(torch.float32).tiny)
    assert ((y.double() - ref).abs() / ulp).max() <= 8


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q,seq_k", [(1, 1), (17, 17), (33, 65), (65, 33), (5, 3)])
def test_sinks_forward(seq_q, seq_k, causal, dtype, device, poison_empty):
    q, k, v = random_qkv(2, 6, 2, seq_q, seq_k, 32, dtype, device)
    sinks = sinks_for(6, device)
    out = flashpatch.attention(q, k, v, causal=causal, sinks=sinks)
    assert_fa2_rule(out, q, k, v, causal=causal, sinks=sinks)


def test_sinks_match_gpt_oss_eager_and_empty_rows_are_zero(device, poison_empty):
    """gpt-oss' eager: softmax over [scores, sink], sink column dropped. A row whose keys are all padded sees only
    the sink: zeros; the lse is the sink's logit there and log(exp(sink) + sum exp(s)) elsewhere."""
    q, k, v = random_qkv(2, 4, 4, 12, 20, 32, torch.float32, device)
    sinks = sinks_for(4, device, torch.bfloat16)  # gpt-oss keeps its sinks in the model's dtype
    mask = torch.ones(2, 20, dtype=torch.bool, device=device)
    mask[1] = False
    out = flashpatch.attention(q, k, v, key_padding_mask=mask, sinks=sinks)
    scores = (q.double() @ k.double().transpose(-1, -2)) * 32 ** -0.5
    combined = torch.cat([scores, sinks.double()[None, :, None, None].expand(2, 4, 12, 1)], -1)
    expected = torch.softmax(combined, -1)[..., :-1] @ v.double()
    torch.testing.assert_close(out[0].double(), expected[0], rtol=1e-5, atol=1e-5)
    assert out[1].abs().max() == 0
    _, lse = torch.ops.flashpatch.attention_fwd(q, k, v, False, 32 ** -0.5, mask, 0.0, 0, None, None, -1, -1, 0.0,
                                                sinks)
    torch.testing.assert_close(lse[0].double(), torch.logsumexp(combined[0], -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[1], sinks.float()[:, None].expand(4, 12))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_everything_combined(causal, dtype, device, poison_empty):
    """window + softcap + sinks + padding + GQA, Sq != Sk, and a static cache's seqused_k."""
    batch, seq_q, seq_k = 3, 31, 58
    q, k, v = random_qkv(batch, 6, 2, seq_q, seq_k, 40, dtype, device)
    mask = torch.rand(batch, seq_k, device=device) > 0.25
    sinks = sinks_for(6, device)
    kw = dict(causal=causal, key_padding_mask=mask, window=(11, 2), softcap=3.0, sinks=sinks)
    assert_fa2_rule(flashpatch.attention(q, k, v, **kw), q, k, v, **kw)
    used = torch.randint(seq_q, seq_k + 1, (batch,), dtype=torch.int32, device=device)
    kw = dict(causal=causal, window=(11, 2), softcap=3.0, sinks=sinks, seqused_k=used)
    assert_fa2_rule(flashpatch.attention(q, k, v, **kw), q, k, v, **kw)


@pytest.mark.parametrize("num_splits", [2, 3, 5])
@pytest.mark.parametrize("seq_q,seq_k,causal", [(1, 200, True), (4, 97, True), (16, 64, False)])
def test_forward_kernel_key_splits(num_splits, seq_q, seq_k, causal, device, poison_empty):
    """The prefill kernel's flash-decoding splits: the sink joins once (split 0), windows leave splits empty."""
    from flashpatch.dispatch import path_for_device
    from flashpatch.kernels import flash_attn_forward, select_config

    q, k, v = random_qkv(2, 4, 2, seq_q, seq_k, 64, torch.float16, device)
    mask = torch.rand(2, seq_k, device=device) > 0.2
    sinks = sinks_for(4, device)
    config = select_config(path_for_device(q.device).family, 64, seq_q)
    kw = dict(causal=causal, scale=0.125, key_padding_mask=mask, window=(30, 5), softcap=4.0, sinks=sinks)
    out, lse = flash_attn_forward(q, k, v, config=config, num_splits=num_splits, **kw)
    assert_fa2_rule(out, q, k, v, **kw)
    _, lse_one = flash_attn_forward(q, k, v, config=config, **kw)
    torch.testing.assert_close(lse, lse_one, rtol=1e-4, atol=1e-4)


# Decode: up to 16 query tokens, GQA groups in one tile, key splits merged by the last program to arrive.
@pytest.mark.parametrize("seq_q", [1, 3, 16])
@pytest.mark.parametrize("heads_q,heads_k", [(4, 4), (8, 2)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_features(seq_q, heads_q, heads_k, dtype, device, poison_empty):
    seq_k = int(torch.randint(seq_q + 20, 250, ()))
    q, k, v = random_qkv(2, heads_q, heads_k, seq_q, seq_k, 64, dtype, device)
    sinks = sinks_for(heads_q, device)
    for kw in (dict(window=(int(torch.randint(0, 40, ())), 0)), dict(softcap=2.0), dict(sinks=sinks),
               dict(window=(13, 0), softcap=5.0, sinks=sinks)):
        out = flashpatch.attention(q, k, v, causal=True, **kw)
        assert_fa2_rule(out, q, k, v, causal=True, **kw)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
def test_decode_splits_with_features(num_splits, device, poison_empty):
    from flashpatch.kernels import TileConfig, flash_decode_forward

    q, k, v = random_qkv(2, 6, 2, 3, 203, 64, torch.float16, device)
    sinks = sinks_for(6, device)
    config = TileConfig(16, 16, 4, 1) if device.type == "cpu" else TileConfig(16, 64, 4, 2)
    mask = torch.rand(2, 203, device=device) > 0.3
    for kw in (dict(window=(40, 0)), dict(sinks=sinks), dict(window=(25, 0), softcap=3.0, sinks=sinks)):
        out, lse = flash_decode_forward(q, k, v, causal=True, scale=0.125, key_padding_mask=mask, seqused_k=None,
                                        config=config, num_splits=num_splits, **kw)
        assert_fa2_rule(out, q, k, v, causal=True, scale=0.125, key_padding_mask=mask, **kw)
        _, lse_one = flash_decode_forward(q, k, v, causal=True, scale=0.125, key_padding_mask=mask, seqused_k=None,
                                          config=config, num_splits=1, **kw)
        torch.testing.assert_close(lse, lse_one, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seq_q", [1, 4, 40])  # 40 query rows: the prefill kernel
def test_window_over_a_static_cache(seq_q, device, poison_empty):
    """seqused_k: the window is aligned to the used length, garbage past it never read."""
    batch, buffer = 3, 150
    q, k, v = random_qkv(batch, 6, 3, seq_q, buffer, 64, torch.float16, device)
    used = torch.randint(seq_q, buffer, (batch,), dtype=torch.int32, device=device)
    k[:, :, -1] = 1e4
    sinks = sinks_for(6, device)
    kw = dict(causal=True, window=(20, 0), sinks=sinks, seqused_k=used)
    assert_fa2_rule(flashpatch.attention(q, k, v, **kw), q, k, v, **kw)


# Backward: dq, dk, dv (and dsinks) against float64 autograd through the reference.
def stored_out_floor(q, k, v, grad_out, sinks, ref64, **kw):
    """How far from float64 each gradient is put by delta = rowsum(dO * out) taking out as stored, rounded to q's
    dtype (as every flash-attention backward does; helpers.grads_given_stored_out). Where a sink takes part of a
    row's weight, a row of one key no longer has out = v exactly, so that rounding reaches dq even at Sq = Sk = 1."""
    grads64, _ = grads_given_stored_out(q, k, v, grad_out, sinks=sinks, **kw)
    return [(g - r).abs().max().item() for g, r in zip(grads64, ref64)] + [0.0]


def check_grads(q, k, v, sinks=None, **kw):
    """FA2's rule for each gradient: |ours - ref64| <= 2 |torch same-dtype - ref64| + 10 eps, the torch error no less
    than what the stored out's rounding alone puts there (`stored_out_floor`)."""
    grad_out = torch.randn_like(q)

    def grads(fn, q, k, v, sinks, dtype=None):
        leaves = [t.detach().clone().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
        extra = {}
        if sinks is not None:
            extra["sinks"] = sinks.detach().clone().to(dtype or sinks.dtype).requires_grad_()
        fn(*leaves, **kw, **extra).backward(grad_out.to(dtype or grad_out.dtype))
        return [t.grad for t in leaves] + ([extra["sinks"].grad] if sinks is not None else [])

    ours = grads(flashpatch.attention, q, k, v, sinks)
    ref64 = grads(reference_attention, q, k, v, sinks, torch.float64)
    same = grads(reference_attention, q, k, v, sinks)
    floors = stored_out_floor(q, k, v, grad_out, sinks, ref64, **kw)
    for name, g, r, s, floor in zip(("q", "k", "v", "sinks"), ours, ref64, same, floors):
        assert torch.isfinite(g).all(), f"d{name} has NaN/Inf"
        err = (g.double() - r).abs().max().item()
        torch_err = (s.double() - r).abs().max().item()
        assert err <= 2 * max(torch_err, floor) + 10 * EPS[q.dtype], \
            f"d{name}: error {err:.3g} vs torch's {torch_err:.3g}, the stored out's {floor:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q,seq_k,window", WINDOWS)
def test_window_backward(seq_q, seq_k, window, causal, dtype, device, no_reference_fallback, poison_empty):
    check_grads(*random_qkv(2, 4, 2, seq_q, seq_k, 32, dtype, device), causal=causal, window=window)


@pytest.mark.parametrize("causal", [False, True])
def test_window_backward_with_padding_gqa_and_segments(causal, device, no_reference_fallback, poison_empty):
    from test_packed import packed_segments

    batch, seq = 3, 43
    mask = torch.rand(batch, seq, device=device) > 0.3
    mask[1, :25] = False
    q, k, v = random_qkv(batch, 6, 2, seq, seq, 32, torch.float32, device)
    check_grads(q, k, v, causal=causal, key_padding_mask=mask, window=(7, 4))
    check_grads(q, k, v, causal=causal, segment_ids=packed_segments(batch, seq, device), window=(7, 4))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("softcap", [1.0, 20.0])
def test_softcap_backward(softcap, causal, dtype, device, no_reference_fallback, poison_empty):
    q, k, v = random_qkv(2, 4, 2, 37, 29, 32, dtype, device)
    check_grads(q * 2, k, v, causal=causal, softcap=softcap)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q,seq_k", [(1, 1), (17, 33), (40, 23)])
def test_sinks_backward(seq_q, seq_k, causal, dtype, device, no_reference_fallback, poison_empty):
    """d sinks = -sum over batch and rows of P_sink * delta, taken from the forward's lse (which holds the sink)."""
    q, k, v = random_qkv(2, 6, 3, seq_q, seq_k, 32, dtype, device)
    check_grads(q, k, v, sinks=sinks_for(6, device), causal=causal)


@pytest.mark.parametrize("window", [(0, -1), (3, -1), None])
def test_sinks_gradient_is_float32_math_on_16_bit_inputs(window, device, no_reference_fallback, poison_empty):
    """d sinks = -sum over rows of P_sink * (dO . O). The dQ kernel sums P * dP per row in float32 for dO . O; the
    stored out, rounded to float16, put it about 4e-3 off (0.4 %) on 128 rows. Its error is float32 math's on the
    same float16 inputs (2x torch's float32 error + 1e-5), not float16's."""
    q, k, v = random_qkv(2, 2, 1, 200, 64, 16, torch.float16, device)
    sinks, grad_out = torch.randn(2, device=device), torch.randn(2, 2, 200, 16, device=device, dtype=torch.float16)

    def dsinks(fn, dtype=None):
        leaves = [t.detach().clone().to(dtype or t.dtype).requires_grad_() for t in (q, k, v, sinks)]
        fn(*leaves[:3], causal=True, window=window, sinks=leaves[3]).backward(grad_out.to(dtype or torch.float16))
        return leaves[3].grad.double()

    ref64 = dsinks(reference_attention, torch.float64)
    err = (dsinks(flashpatch.attention) - ref64).abs().max().item()
    err32 = (dsinks(reference_attention, torch.float32) - ref64).abs().max().item()
    assert err <= 2 * err32 + 1e-5, f"d sinks: error {err:.3g} vs torch float32's {err32:.3g}"


@pytest.mark.parametrize("causal", [False, True])
def test_everything_combined_backward(causal, device, no_reference_fallback, poison_empty):
    batch = 3
    q, k, v = random_qkv(batch, 6, 2, 35, 47, 32, torch.float32, device)
    mask = torch.rand(batch, 47, device=device) > 0.25
    mask[2] = False  # no key at all: only the sink, no gradient but the sink's (zero)
    check_grads(q, k, v, sinks=sinks_for(6, device), causal=causal, key_padding_mask=mask, window=(9, 5),
                softcap=4.0)


def test_sinks_in_bfloat16_get_a_gradient_in_their_dtype(device):
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 2, 1, 9, 9, 32, torch.float32, device))
    sinks = sinks_for(2, device, torch.bfloat16).requires_grad_()
    flashpatch.attention(q, k, v, causal=True, sinks=sinks).sum().backward()
    assert sinks.grad.dtype == torch.bfloat16 and sinks.grad.shape == (2,) and torch.isfinite(sinks.grad).all()


# Plans: kinds never mix; the sm90 Gluon forward never serves these calls.
def test_plans_keep_kinds_apart_and_bind_sinks_per_call(device, poison_empty):
    from flashpatch.kernels.plans import PLANS

    ops.reset_caches()
    q, k, v = random_qkv(2, 4, 2, 40, 40, 32, torch.float16, device)
    sinks = sinks_for(4, device)
    kinds = [dict(), dict(window=(5, 0)), dict(window=(6, 0)), dict(softcap=3.0), dict(softcap=4.0),
             dict(sinks=sinks), dict(window=(5, 0), softcap=3.0, sinks=sinks)]
    for kw in kinds:
        for _ in range(2):  # the second call of a kind goes straight to its plan
            out = flashpatch.attention(q, k, v, causal=True, **kw)
            assert_fa2_rule(out, q, k, v, causal=True, **kw)
    assert len(PLANS) == len(kinds)
    other = sinks_for(4, device) + 3  # same kind, other values: the plan binds them per call
    out = flashpatch.attention(q, k, v, causal=True, sinks=other)
    assert_fa2_rule(out, q, k, v, causal=True, sinks=other)
    assert len(PLANS) == len(kinds)
    plans = list(PLANS.plans.values())
    flags = [(p.constexprs["WINDOW"], p.constexprs["SOFTCAP"], p.constexprs["HAS_SINKS"], p.constexprs["CAUSAL"])
             for p in plans]
    assert flags[0] == (False, False, False, True)  # the plain kind: the causal path, nothing new
    assert flags[1] == (True, False, False, False)  # a causal window runs as the band (right = 0)


def test_windows_that_bound_nothing_run_the_plain_paths():
    from flashpatch.kernels.online_softmax import WINDOW_UNBOUNDED, kernel_window

    assert kernel_window(True, None) is None and kernel_window(False, (-1, -1)) is None
    assert kernel_window(True, (-1, 5)) is None  # causal already bounds the right
    assert kernel_window(True, (4, 5)) == (4, 0)
    assert kernel_window(False, (-1, 3)) == (WINDOW_UNBOUNDED, 3)


def test_sm90_candidates_are_none_for_the_new_features():
    from flashpatch.kernels.plans import sm90_candidates

    q = k = v = torch.empty(1, 2, 300, 64, dtype=torch.bfloat16, device="meta")
    base = dict(dropout_p=0.0, key_padding_mask=None, seqused_k=None, segment_ids=None)
    assert sm90_candidates("sm90", q, k, v, **base, window=(127, 0)) == []
    assert sm90_candidates("sm90", q, k, v, **base, softcap=50.0) == []
    assert sm90_candidates("sm90", q, k, v, **base, sinks=torch.zeros(2, device="meta")) == []


@pytest.mark.parametrize("kwargs,match", [
    (dict(window=(3,)), "window must be"), (dict(window=(-2, 0)), "window must be"),
    (dict(window=(1.5, 0)), "window must be"), (dict(softcap=-1.0), "softcap must be"),
    (dict(softcap=float("nan")), "softcap must be"), (dict(sinks=torch.zeros(3)), r"sinks must be .*\[4\]"),
    (dict(sinks=torch.zeros(4, dtype=torch.int32)), "sinks must be"),
])
def test_bad_feature_arguments_are_named(kwargs, match):
    q, k, v = random_qkv(1, 4, 2, 8, 8, 32, torch.float32)
    with pytest.raises(AttentionInputError, match=match):
        flashpatch.attention(q, k, v, causal=True, **kwargs)


# GPU: the same features in bf16 at the real tiles (kernels/config.py's rows), forward, backward and decode.
@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q,seq_k,window", [(1000, 1000, (127, 0)), (513, 1537, (255, 64)),
                                                 (777, 777, (4095, 0)), (300, 300, (-1, 31))])
def test_gpu_bf16_window(seq_q, seq_k, window, causal):
    q, k, v = random_qkv(2, 8, 2, seq_q, seq_k, 128, torch.bfloat16, "cuda")
    assert_fa2_rule(flashpatch.attention(q, k, v, causal=causal, window=window), q, k, v, causal=causal,
                    window=window)
    check_grads(*random_qkv(1, 4, 2, min(seq_q, 600), min(seq_k, 600), 128, torch.bfloat16, "cuda"),
                causal=causal, window=window)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_gpu_bf16_softcap_and_sinks(head_dim):
    q, k, v = random_qkv(2, 8, 4, 700, 700, head_dim, torch.bfloat16, "cuda")
    sinks = sinks_for(8, "cuda", torch.bfloat16)
    for kw in (dict(softcap=50.0), dict(softcap=5.0), dict(sinks=sinks), dict(window=(255, 0), softcap=30.0,
                                                                               sinks=sinks)):
        assert_fa2_rule(flashpatch.attention(q * 3, k, v, causal=True, **kw), q * 3, k, v, causal=True, **kw)
    check_grads(*random_qkv(1, 8, 4, 400, 400, head_dim, torch.bfloat16, "cuda"), sinks=sinks, causal=True,
                softcap=30.0, window=(127, 0))


@pytest.mark.gpu
@pytest.mark.parametrize("seq_k", [100, 4096, 40000])
def test_gpu_bf16_decode_features(seq_k):
    """Decode (split across SMs at long caches) with a window, softcap and sinks."""
    q, k, v = random_qkv(4, 32, 8, 1, seq_k, 128, torch.bfloat16, "cuda")
    sinks = sinks_for(32, "cuda", torch.bfloat16)
    for kw in (dict(window=(4095, 0)), dict(softcap=50.0), dict(sinks=sinks),
               dict(window=(127, 0), softcap=30.0, sinks=sinks)):
        assert_fa2_rule(flashpatch.attention(q, k, v, causal=True, **kw), q, k, v, causal=True, **kw)


def windowed_dropout_reference(q, k, v, *, keep, p, causal, window=None, softcap=None):
    """reference_attention's probabilities (window, softcap), dropped by `keep` and rescaled by 1 / (1 - p)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    mask = visibility_mask(q.shape[2], k.shape[2], causal=causal, key_padding_mask=None, device=q.device,
                           window=window)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1).masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return (probs * keep.to(q.dtype) / (1 - p)) @ v


@pytest.mark.parametrize("causal", [False, True])
def test_window_and_softcap_with_dropout(causal, device, no_reference_fallback, poison_empty):
    """Dropout's Philox mask is a function of position only: the band and the cap leave it as it is, forward and
    backward."""
    import functools

    from test_backward import check, kernel_keep_mask

    p, seed = 0.3, int(torch.randint(0, 2**30, ()))
    keep = kernel_keep_mask(2, 2, 23, 37, seed, p, device)
    check(*random_qkv(2, 2, 1, 23, 37, 64, torch.float32, device),
          reference=functools.partial(windowed_dropout_reference, keep=keep, p=p),
          ours_kw=dict(dropout_p=p, seed=seed), causal=causal, window=(6, 3), softcap=2.0)
