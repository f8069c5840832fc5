"""The Gluon Hopper backward (kernels/backward_sm90.py) against float64 gradients on an sm90 GPU.

FA2's rule for each of dq, dk, dv: |grad - ref64| <= 2 * |torch same-dtype grad - ref64| + eps, where ref64 is
autograd through flashpatch.reference in float64 and the same-dtype grads are autograd through it in the inputs'
dtype. The backward gets out (rounded to the inputs' dtype) and lse from float64, so only it is under test. Outputs
are allocated by torch.empty, which the poison_empty fixture fills with NaN: an element the kernels fail to write
shows. Compiling for sm90 without a GPU: scripts/sm90_backward_probe.py --compile-only.
"""

import pytest
import torch

from flashpatch.kernels import backward_sm90
from flashpatch.kernels.backward_sm90 import SM90_BWD_CONFIGS, flash_attn_backward_sm90, sm90_backward_eligible
from flashpatch.reference import reference_attention, visibility_mask
from helpers import EPS, HOPPER, bshd, random_qkv

pytestmark = pytest.mark.gpu
needs_hopper = pytest.mark.skipif(not (HOPPER and backward_sm90.HAS_GLUON),
                                  reason="needs an sm90 GPU and a Triton with Gluon")
MAX_CONFIGS = max(len(configs) for configs in SM90_BWD_CONFIGS.values())


def forward_out_lse(q, k, v, causal, scale, **masks):
    """What a forward hands the backward, from float64: out in q's dtype and layout, lse float32. masks:
    key_padding_mask, segment_ids."""
    out = torch.empty_like(q).copy_(reference_attention(q.double(), k.double(), v.double(), causal=causal,
                                                        scale=scale, **masks))
    group = q.shape[1] // k.shape[1]
    scores = (q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2)) * scale
    mask = visibility_mask(q.shape[2], k.shape[2], causal=causal, key_padding_mask=masks.get("key_padding_mask"),
                           segment_ids=masks.get("segment_ids"), device=q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return out, torch.logsumexp(scores, -1).float()


def autograd_grads(q, k, v, grad_out, causal, scale, **masks):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    reference_attention(*leaves, causal=causal, scale=scale, **masks).backward(grad_out)
    return [t.grad for t in leaves]


def check(q, k, v, causal, config=None, **masks):
    """masks: key_padding_mask, segment_ids (None or absent: none)."""
    masks = {name: t for name, t in masks.items() if t is not None}
    scale = q.shape[-1] ** -0.5
    grad_out = torch.randn_like(q)
    out, lse = forward_out_lse(q, k, v, causal, scale, **masks)
    if not sm90_backward_eligible(grad_out, q, k, v, out):
        pytest.skip("the sm90 backward does not take these inputs")
    ours = flash_attn_backward_sm90(grad_out, q, k, v, out, lse, causal=causal, scale=scale, config=config, **masks)
    ref64 = autograd_grads(q.double(), k.double(), v.double(), grad_out.double(), causal, scale, **masks)
    same = autograd_grads(q, k, v, grad_out, causal, scale, **masks)
    for name, g, r, s, t in zip("qkv", ours, ref64, same, (q, k, v)):
        assert g.shape == t.shape and g.dtype == t.dtype
        assert g.stride() == t.stride(), f"d{name} is not laid out as {name}"
        assert torch.isfinite(g).all(), f"d{name} has NaN/Inf (unwritten or broken rows)"
        err = (g.double() - r).abs().max().item()
        torch_err = (s.double() - r).abs().max().item()
        assert err <= 2 * torch_err + EPS[q.dtype], f"d{name}: error {err:.3g} vs torch's own {torch_err:.3g}"
    if "key_padding_mask" in masks:  # padding keys get no gradient
        padding = ~masks["key_padding_mask"][:, None, :, None]
        assert (ours[1].masked_select(padding) == 0).all() and (ours[2].masked_select(padding) == 0).all()
    seq_q, seq_k = q.shape[2], k.shape[2]
    if causal and seq_q > seq_k:  # bottom-right: the first Sq - Sk query rows see no key
        assert (ours[0][:, :, :seq_q - seq_k] == 0).all(), "rows without keys must get a zero dq"


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q,seq_k", [(1, 1), (17, 17), (255, 255), (1000, 1000), (77, 333), (300, 100),
                                         (128, 2049)])
def test_matches_float64(dtype, head_dim, causal, seq_q, seq_k, seed, poison_empty):
    q, k, v = random_qkv(2, 4, 2, seq_q, seq_k, head_dim, dtype, "cuda")
    check(q, k, v, causal)


@needs_hopper
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("index", range(MAX_CONFIGS))
@pytest.mark.parametrize("causal", [False, True])
def test_every_config(head_dim, index, causal, seed, poison_empty):
    """Each candidate (dQ per block or per warpgroup, TMA reduce-add or atomics, stages, one or two consumers,
    with and without warp specialisation) on GQA 32/8 in the projection layout with ragged ends, twice in a row
    (dQaccum starts from zero every call)."""
    if index >= len(SM90_BWD_CONFIGS[head_dim]):
        pytest.skip("no such candidate")
    q, k, v = random_qkv(2, 32, 8, 700, 700, head_dim, torch.bfloat16, "cuda")
    for _ in range(2):
        check(bshd(q), bshd(k), bshd(v), causal, config=SM90_BWD_CONFIGS[head_dim][index])


@needs_hopper
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("batch,heads_q,heads_k,masks", [(2, 64, 64, ""), (3, 32, 8, ""), (8, 16, 16, "kpm"),
                                                          (8, 16, 16, "seg")])
@pytest.mark.parametrize("dynamic", [False, True])
def test_persistent_programs_walk_several_tiles(head_dim, causal, batch, heads_q, heads_k, masks, dynamic, seed,
                                                poison_empty):
    """Each persistent config (static rounds, dynamic hand-out) with more key blocks than SMs, so a program walks
    several: the Q/dO ring's slots, the dS^T exchange's buffers and the K/V reload carry on from tile to tile (GQA,
    key padding, segments); twice in a row (the dynamic schedule's counter is back at zero for the second)."""
    config = next(c for c in SM90_BWD_CONFIGS[head_dim] if c.persistent and c.dynamic == dynamic)
    seq = 1100
    tiles = batch * heads_k * -(-seq // config.block_n)
    assert tiles > torch.cuda.get_device_properties(0).multi_processor_count
    q, k, v = random_qkv(batch, heads_q, heads_k, seq, seq, head_dim, torch.bfloat16, "cuda")
    extra = dict(key_padding_mask=padding_mask("right", batch, seq)) if masks == "kpm" else \
        dict(segment_ids=packed_ids(batch, seq)) if masks == "seg" else {}
    for _ in range(2):
        check(bshd(q), bshd(k), bshd(v), causal, config=config, **extra)
    if dynamic:
        from flashpatch.kernels import forward_sm90

        torch.cuda.synchronize()
        assert all(int(c.item()) == 0 for c in forward_sm90._COUNTERS.values())


@needs_hopper
@pytest.mark.parametrize("heads_q,heads_k", [(32, 8), (8, 1), (4, 4)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gqa_and_projection_layout(heads_q, heads_k, causal, dtype, seed, poison_empty):
    """dk/dv summed over each K/V head's group of query heads; [B, S, H, D] memory in, the same layout out."""
    q, k, v = random_qkv(2, heads_q, heads_k, 333, 513, 128, dtype, "cuda")
    check(bshd(q), bshd(k), bshd(v), causal)


@needs_hopper
@pytest.mark.parametrize("seq_q,seq_k", [(300, 100), (129, 64), (1000, 1)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_causal_rows_without_keys(seq_q, seq_k, head_dim, seed, poison_empty):
    """Causal with Sq > Sk: the first Sq - Sk rows see no key (lse = -inf); their dq is exactly zero and no NaN
    reaches the rows and keys that do take part."""
    q, k, v = random_qkv(1, 8, 2, seq_q, seq_k, head_dim, torch.float16, "cuda")
    check(bshd(q), bshd(k), bshd(v), True)


@needs_hopper
@pytest.mark.parametrize("head_dim", [80, 96])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims_80_96(head_dim, causal, seed, poison_empty):
    """Served by the 128-wide kernel over descriptors of the true width (zero-filled loads, clipped stores)."""
    q, k, v = random_qkv(2, 8, 2, 300, 300, head_dim, torch.bfloat16, "cuda")
    check(bshd(q), bshd(k), bshd(v), causal)


@needs_hopper
@pytest.mark.parametrize("causal", [False, True])
def test_long_rows_fp16(causal, seed, poison_empty):
    """fp16 with many query blocks per key block and a ragged last key block (keys past Sk read as zeros by TMA
    must get P = 0, not exp(-lse))."""
    q, k, v = random_qkv(1, 4, 4, 2000, 1999, 128, torch.float16, "cuda")
    check(q * 2, k * 2, v, causal)


@needs_hopper
def test_eligibility():
    q, k, v = random_qkv(1, 2, 2, 16, 16, 64, torch.float16, "cuda")
    assert sm90_backward_eligible(q, q, k, v, q) and sm90_backward_eligible(bshd(q), bshd(q), bshd(k), bshd(v), q)
    assert not sm90_backward_eligible(q.float(), q.float(), k.float(), v.float(), q.float())
    assert not sm90_backward_eligible(q, q, k.bfloat16(), v, q)  # mixed dtypes
    for head_dim in (72, 256):
        q2, k2, v2 = random_qkv(1, 2, 2, 16, 16, head_dim, torch.float16, "cuda")
        assert not sm90_backward_eligible(q2, q2, k2, v2, q2)
    q96, k96, v96 = random_qkv(1, 2, 2, 16, 16, 96, torch.float16, "cuda")
    assert sm90_backward_eligible(q96, q96, k96, v96, q96)
    padded = torch.randn(1, 2, 16, 68, dtype=torch.float16, device="cuda")[..., :64]  # rows 136 bytes apart
    assert not sm90_backward_eligible(padded, q, k, v, q)  # grad_out
    assert not sm90_backward_eligible(q, q, k, v, padded)  # out
    q3, k2, v2 = random_qkv(1, 3, 2, 16, 16, 64, torch.float16, "cuda")
    assert not sm90_backward_eligible(q3, q3, k2, v2, q3)  # 3 query heads over 2 K/V heads


def padding_mask(kind: str, batch: int, seq_k: int) -> torch.Tensor:
    """bool [B, Sk], True = attend: left or right padding of random lengths (batch 0 keeps every key, the last
    keeps one or none), or random holes."""
    if kind == "holes":
        return torch.rand(batch, seq_k, device="cuda") > 0.3
    lengths = torch.randint(1, seq_k + 1, (batch,), device="cuda")
    lengths[0] = seq_k
    lengths[-1] = 0 if kind == "right" else 1
    keys = torch.arange(seq_k, device="cuda")[None]
    return keys >= seq_k - lengths[:, None] if kind == "left" else keys < lengths[:, None]


@needs_hopper
@pytest.mark.parametrize("kind", ["left", "right", "holes"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("seq_q,seq_k", [(333, 513), (700, 700), (64, 1)])
def test_key_padding_mask(kind, causal, head_dim, seq_q, seq_k, seed, poison_empty):
    """P = 0 for padding keys in every query block of a key block that holds one (their dK, dV exactly zero); a
    batch whose keys are all padding gets zero gradients, not NaN. GQA 8/2, the projection layout."""
    q, k, v = random_qkv(3, 8, 2, seq_q, seq_k, head_dim, torch.bfloat16, "cuda")
    check(bshd(q), bshd(k), bshd(v), causal, key_padding_mask=padding_mask(kind, 3, seq_k))


@needs_hopper
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("index", range(MAX_CONFIGS))
def test_key_padding_mask_every_config(head_dim, index, seed, poison_empty):
    """Each warp-specialised candidate with a padded batch; the kernel without warp specialisation refuses one."""
    if index >= len(SM90_BWD_CONFIGS[head_dim]):
        pytest.skip("no such candidate")
    config = SM90_BWD_CONFIGS[head_dim][index]
    q, k, v = random_qkv(2, 8, 4, 500, 500, head_dim, torch.float16, "cuda")
    mask = padding_mask("right", 2, 500)
    if not config.warp_specialize:
        with pytest.raises(ValueError, match="no key padding mask"):
            check(q, k, v, False, config=config, key_padding_mask=mask)
        return
    check(q, k, v, False, config=config, key_padding_mask=mask)


def packed_ids(batch: int, seq: int, lengths=None) -> torch.Tensor:
    """int32 [B, S]: sequences end to end, ids 0, 1, 2, ... (what position_ids restarting give): random lengths
    (a few long, many short) or the lengths given, repeated to fill the row."""
    rows = []
    for _ in range(batch):
        sizes = lengths or torch.randint(1, max(2, seq // 3), (seq, )).tolist()
        ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))[:seq]
        rows.append(torch.cat([ids, ids.new_full((seq - len(ids), ), len(sizes))]))
    return torch.stack(rows).to(device="cuda", dtype=torch.int32)


@needs_hopper
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("seq,lengths", [(700, None), (1000, [5, 300, 1, 129, 64, 500]), (257, [257]),
                                         (600, [1] * 600)])
def test_segment_ids(causal, head_dim, seq, lengths, seed, poison_empty):
    """Packed sequences: P = 0 between segments, and the query blocks outside a key block's own sequences are
    skipped (a segment of one token each, one segment for the whole row, random lengths). GQA 8/2, the projection
    layout."""
    q, k, v = random_qkv(2, 8, 2, seq, seq, head_dim, torch.bfloat16, "cuda")
    check(bshd(q), bshd(k), bshd(v), causal, segment_ids=packed_ids(2, seq, lengths))


@needs_hopper
@pytest.mark.parametrize("causal", [False, True])
def test_segment_ids_out_of_order_and_with_padding(causal, seed, poison_empty):
    """Segment ids that decrease along the row (nothing skipped: each row's runs are not its segments) and a key
    padding mask on top."""
    q, k, v = random_qkv(2, 4, 4, 500, 500, 128, torch.float16, "cuda")
    ids = (torch.arange(500, device="cuda") // 70 * 3 % 4).to(torch.int32)[None].repeat(2, 1)
    mask = padding_mask("holes", 2, 500)
    check(q, k, v, causal, segment_ids=ids, key_padding_mask=mask)
