"""The route from a call to a launch (kernels/plans.py), where a GPU is needed to run it: checked on the CPU with the
GPU-only kernels stood in for by the float64 reference."""

import pytest
import torch

from flashpatch.kernels import TileConfig, plans
from flashpatch.kernels.forward_sm90 import Sm90Config
from flashpatch.reference import reference_attention


def test_an_sm90_plan_serves_calls_in_transformers_layout_and_falls_back_for_views_tma_cannot_take(monkeypatch):
    """Sm90Plan.run returns [B, Sq, H, D] (the plans' contract) from the Gluon kernel's SDPA-layout output, passes
    only the masks a call has (and the plan's softcap and window, the call's sinks), and hands a misaligned view to
    its pointer plan, sinks included."""
    from flashpatch.kernels import forward_sm90

    calls, features = [], []

    def fake_gluon(q, k, v, *, causal, scale, need_lse, config, softcap, window, sinks, **masks):
        calls.append(sorted(masks))
        features.append((softcap, window, sinks))
        out = reference_attention(q.double(), k.double(), v.double(), causal=causal, scale=scale).to(q.dtype)
        return out.transpose(1, 2).contiguous().transpose(1, 2), None  # SDPA view of [B, S, H, D] memory

    class PointerPlan:
        def run(self, q, k, v, *args):
            calls.append(("pointer", args[-1] if len(args) == 5 else None))
            return torch.zeros(q.shape[0], q.shape[2], q.shape[1], q.shape[3]), None

    monkeypatch.setattr(forward_sm90, "flash_attn_forward_sm90", fake_gluon)
    plan = plans.Sm90Plan(Sm90Config(128, 2), PointerPlan(), causal=True, scale=0.125, need_lse=False)
    q = torch.randn(2, 3, 40, 8, dtype=torch.float16)
    k, v = (torch.randn(2, 1, 40, 8, dtype=torch.float16) for _ in range(2))
    out, _ = plan.run(q, k, v)
    ref = reference_attention(q.double(), k.double(), v.double(), causal=True, scale=0.125)
    torch.testing.assert_close(out.double(), ref.transpose(1, 2), rtol=2e-3, atol=2e-3)
    plan.run(q, k, v, torch.ones(2, 40, dtype=torch.bool))
    assert calls == [[], ["key_padding_mask"]]
    shifted = torch.empty(q.numel() + 1, dtype=q.dtype)[1:].view(q.shape)  # 2 bytes off 16-byte alignment
    sinks = torch.zeros(3)
    plan.run(shifted, k, v, None, None, None, 0, sinks)
    assert calls[-1] == ("pointer", sinks)
    capped = plans.Sm90Plan(Sm90Config(128, 2), PointerPlan(), causal=True, scale=0.125, need_lse=False,
                            softcap=30.0, window=(15, 0))
    capped.run(q, k, v, sinks=sinks)
    assert features == [(0.0, None, None)] * 2 + [(30.0, (15, 0), sinks)]


@pytest.mark.parametrize("switch,expected", [(None, True), ("0", False), ("1", True)])
def test_the_gluon_forward_joins_the_candidates_unless_switched_off(monkeypatch, switch, expected):
    """The Gluon sm90 configs are among an sm90 call's autotuning candidates (where the kernel can take the call);
    with FLASHPATCH_GLUON=0 the portable kernels serve alone."""
    from flashpatch.kernels import forward_sm90

    monkeypatch.setattr(forward_sm90, "sm90_refusal", lambda q, k, v, **masks: None)
    if switch is None:
        monkeypatch.delenv(plans.GLUON_SWITCH, raising=False)
    else:
        monkeypatch.setenv(plans.GLUON_SWITCH, switch)
    q = k = v = torch.zeros(1, 1, 64, 128, dtype=torch.bfloat16)
    found = plans.sm90_candidates("sm90", q, k, v, dropout_p=0.0, key_padding_mask=None, seqused_k=None,
                                  segment_ids=None)
    assert bool(found) == expected and all(isinstance(c, Sm90Config) for c in found)
    assert not plans.sm90_candidates("sm80", q, k, v, dropout_p=0.0, key_padding_mask=None, seqused_k=None,
                                     segment_ids=None)
    assert not plans.sm90_candidates("sm90", q, k, v, dropout_p=0.1, key_padding_mask=None, seqused_k=None,
                                     segment_ids=None)


def test_the_gluon_refusal_names_its_reason(monkeypatch):
    """Each reason the Gluon sm90 forward is not a candidate, in the words kernels_used() reports."""
    from flashpatch.kernels import forward_sm90

    q = k = v = torch.zeros(1, 1, 64, 128, dtype=torch.bfloat16)
    call = dict(dropout_p=0.0, key_padding_mask=None, seqused_k=None, segment_ids=None)
    monkeypatch.delenv(plans.GLUON_SWITCH, raising=False)
    assert plans.sm90_refusal("sm80", q, k, v, **call) == "not a Hopper (sm90) GPU"
    monkeypatch.delenv(plans.GLUON_FEATURES_SWITCH, raising=False)
    for change, words in ((dict(dropout_p=0.1), "dropout"), (dict(window=(63, 0)), "a sliding window")):
        assert plans.sm90_refusal("sm90", q, k, v, **dict(call, **change)).startswith(words)
    assert plans.sm90_refusal("sm90", q, k, v, **call) in ("not a Hopper (sm90) GPU", "this Triton has no Gluon")
    monkeypatch.setattr(forward_sm90, "sm90_refusal", lambda q, k, v, **masks: None)
    assert plans.sm90_refusal("sm90", q, k, v, **call) is None
    monkeypatch.setenv(plans.GLUON_SWITCH, "0")
    assert plans.sm90_refusal("sm90", q, k, v, **call) == "FLASHPATCH_GLUON=0"
    monkeypatch.delenv(plans.GLUON_SWITCH)
    # causal windows, softcapping and sinks are taken; other windows not; FLASHPATCH_GLUON_FEATURES=0 takes none
    assert plans.sm90_refusal("sm90", q, k, v, **call, window=(63, 0), softcap=30.0, causal=True) is None
    assert plans.sm90_refusal("sm90", q, k, v, **call, window=(63, 0)).startswith("a sliding window")  # not causal
    assert plans.sm90_refusal("sm90", q, k, v, **call, window=(63, 5), causal=True).startswith("a sliding window")
    assert plans.sm90_refusal("sm90", q, k, v, **call, sinks=torch.zeros(1), window=(63, 0), causal=True) is None
    monkeypatch.setenv(plans.GLUON_FEATURES_SWITCH, "0")
    assert plans.sm90_refusal("sm90", q, k, v, **call, sinks=torch.zeros(1)).startswith("sinks")
    assert plans.sm90_refusal("sm90", q, k, v, **call, softcap=30.0).startswith("softcapping")
    assert plans.sm90_refusal("sm90", q, k, v, **call, window=(63, 0), causal=True).startswith("a sliding window")


def test_the_sm90_backward_refusal_names_its_reason(monkeypatch):
    """Each reason a backward stays on the portable kernels, in the words kernels_used() reports; a plain Hopper
    call is served (refusal None) unless switched off or deterministic algorithms are asked for."""
    from flashpatch.kernels import backward_sm90

    q = k = v = torch.zeros(1, 1, 64, 128, dtype=torch.bfloat16)
    call = dict(key_padding_mask=None, dropout_p=0.0, segment_ids=None, window=None, softcap=None, sinks=None)
    assert plans.sm90_backward_refusal("sm80", q, q, k, v, q, **call) == "not a Hopper (sm90) GPU"
    for change, words in ((dict(dropout_p=0.1), "dropout"), (dict(window=(63, 0)), "a sliding window"),
                          (dict(softcap=30.0), "softcapping"), (dict(sinks=torch.zeros(1)), "sinks")):
        assert plans.sm90_backward_refusal("sm90", q, q, k, v, q, **dict(call, **change)).startswith(words)
    monkeypatch.setattr(backward_sm90, "HAS_GLUON", True)
    monkeypatch.setattr(backward_sm90, "sm90_backward_eligible", lambda *tensors: False)
    assert plans.sm90_backward_refusal("sm90", q, q, k, v, q, **call).startswith("dtype, head dim or strides")
    monkeypatch.setattr(backward_sm90, "sm90_backward_eligible", lambda *tensors: True)
    assert plans.sm90_backward_refusal("sm90", q, q, k, v, q, **call) is None
    masks = dict(key_padding_mask=torch.ones(1, 64, dtype=torch.bool), segment_ids=torch.zeros(1, 64))
    assert plans.sm90_backward_refusal("sm90", q, q, k, v, q, **dict(call, **masks)) is None
    monkeypatch.setenv(plans.SM90_BACKWARD_SWITCH, "0")
    assert plans.sm90_backward_refusal("sm90", q, q, k, v, q, **call) == "FLASHPATCH_SM90_BACKWARD=0"
    monkeypatch.delenv(plans.SM90_BACKWARD_SWITCH)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert plans.sm90_backward_refusal("sm90", q, q, k, v, q, **call).startswith("deterministic")


def test_a_hopper_training_call_reaches_the_sm90_backward(monkeypatch, device):
    """flashpatch.attention's backward on an sm90 device, plain: the Gluon backward gets the call's tensors, causal
    and scale, and a key padding mask or segment ids with them; with dropout the portable one does. The kernels are
    stand-ins; the forward is real (the interpreter on a CPU)."""
    import flashpatch
    from flashpatch import ops
    from flashpatch.dispatch import KernelPath
    from flashpatch.kernels import backward_sm90

    calls = []

    def sm90(grad_out, q, k, v, out, lse, *, causal, scale, key_padding_mask, segment_ids):
        calls.append(("sm90", causal, scale, q.shape, k.shape, key_padding_mask is not None, segment_ids is not None))
        return torch.full_like(q, 1.0), torch.full_like(k, 2.0), torch.full_like(v, 3.0)

    def portable(grad_out, q, k, v, out, lse, *, dropout_p, **kw):
        calls.append(("portable", dropout_p))
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None

    monkeypatch.setattr(backward_sm90, "HAS_GLUON", True)
    monkeypatch.setattr(backward_sm90, "sm90_backward_eligible", lambda *tensors: True)
    monkeypatch.setattr(backward_sm90, "flash_attn_backward_sm90", sm90)
    monkeypatch.setattr(plans, "flash_attn_backward", portable)
    real_info = ops.device_info
    monkeypatch.setattr(ops, "device_info", lambda q: (KernelPath("triton-sm90", "sm90", "test"),
                                                       *real_info(q)[1:]))
    ops.reset_caches()
    q = torch.randn(1, 4, 24, 16, device=device, requires_grad=True)
    k, v = (torch.randn(1, 2, 24, 16, device=device, requires_grad=True) for _ in range(2))
    flashpatch.attention(q, k, v, causal=True, scale=0.3).sum().backward()
    assert calls == [("sm90", True, 0.3, (1, 4, 24, 16), (1, 2, 24, 16), False, False)]
    assert (q.grad == 1.0).all() and (k.grad == 2.0).all() and (v.grad == 3.0).all()
    calls.clear()
    mask = torch.ones(1, 24, dtype=torch.bool, device=device)
    mask[0, -3:] = False
    flashpatch.attention(q, k, v, causal=True, key_padding_mask=mask).sum().backward()
    segments = torch.tensor([[0] * 10 + [1] * 14], device=device)
    flashpatch.attention(q, k, v, causal=True, segment_ids=segments).sum().backward()
    flashpatch.attention(q, k, v, causal=True, dropout_p=0.5).sum().backward()
    flashpatch.attention(q, k, v, causal=True, window=(23, 0)).sum().backward()  # 24 keys: bounds nothing
    flashpatch.attention(q, k, v, causal=True, window=(22, 0)).sum().backward()
    assert [c[-2:] for c in calls] == [(True, False), (False, True), ("portable", 0.5), (False, False),
                                       ("portable", 0.0)]
    kinds = [(u["kernel"], u["why_not_gluon"]) for u in flashpatch.kernels_used() if u["kernel"].endswith("-backward")]
    assert kinds == [("gluon-sm90-backward", None)] * 3 + [
        ("portable-backward", "dropout (the portable backward serves it)"),
        ("portable-backward", "a sliding window (the portable backward serves it)")]
    ops.reset_caches()


def test_kernels_used_lists_the_backward_of_each_kind_of_training_call(device):
    """A backward is listed after the forward plans, with the kernel that ran it and why it was not the Gluon one."""
    import flashpatch
    from flashpatch import ops

    ops.reset_caches()
    q, k, v = (torch.randn(1, 2, 24, 16, device=device, requires_grad=True) for _ in range(3))
    flashpatch.attention(q, k, v, causal=True).sum().backward()
    backward = [u for u in flashpatch.kernels_used() if u["kernel"].endswith("-backward")]
    assert backward == [dict(q=(1, 2, 24, 16), keys=24, kv_heads=2, dtype="float32", causal=True, masks=[],
                             features=[], kernel="portable-backward", why_not_gluon=backward[0]["why_not_gluon"])]
    assert backward[0]["why_not_gluon"] in ("not a Hopper (sm90) GPU", "dtype, head dim or strides (16-bit, head "
                                            "dim 64/80/96/128, TMA-legal views)")
    ops.reset_caches()
    assert flashpatch.kernels_used() == []


def test_kernels_used_lists_each_kind_of_call_with_its_kernel(device):
    import flashpatch
    from flashpatch import ops

    ops.reset_caches()
    q = torch.randn(1, 2, 40, 32, device=device)
    k, v = (torch.randn(1, 1, 40, 32, device=device) for _ in range(2))
    flashpatch.attention(q, k, v, causal=True)
    flashpatch.attention(q[:, :, :1], k, v, causal=True)
    flashpatch.attention(q, k, v, causal=False, window=(7, 7), softcap=3.0, key_padding_mask=torch.ones(
        1, 40, dtype=torch.bool, device=device))
    used = flashpatch.kernels_used()
    assert [u["kernel"] for u in used] == ["portable", "decode", "portable"]
    assert used[0] | {"why_not_gluon": None, "tile": None} == dict(
        q=(1, 2, 40, 32), keys=40, kv_heads=1, dtype="float32", causal=True, masks=[], features=[], kernel="portable",
        why_not_gluon=None, tile=None, tuning=None)  # float32, or no GPU: nothing tuned
    assert all(u["tile"].startswith("m") for u in used)  # e.g. m64n32w4s2, the tile table's row
    assert used[0]["why_not_gluon"] in ("no GPU", "float32")
    assert used[1]["keys"] == "any" and used[1]["why_not_gluon"].startswith("few query rows")
    assert used[2]["masks"] == ["key_padding_mask"] and used[2]["features"] == ["window", "softcap"]
    ops.reset_caches()
    assert flashpatch.kernels_used() == []


def test_plan_kinds_do_not_mix():
    """Calls that differ in what a plan fixes get different keys: dropout rate, lse, masks, segments; a decode call's
    key leaves out the cache length (its plan follows a growing cache), a prefill's keeps it."""
    q = torch.zeros(1, 4, 32, 64, dtype=torch.float16)
    k = torch.zeros(1, 2, 48, 64, dtype=torch.float16)
    mask = torch.ones(1, 48, dtype=torch.bool)
    base = plans.plan_key(q, k, k, True, 0.125, None, None)
    variants = [plans.plan_key(q, k, k, True, 0.125, mask, None), plans.plan_key(q, k, k, True, 0.125, None, None,
                                                                                 dropout_p=0.1),
                plans.plan_key(q, k, k, True, 0.125, None, None, dropout_p=0.2),
                plans.plan_key(q, k, k, True, 0.125, None, None, need_lse=True),
                plans.plan_key(q, k, k, False, 0.125, None, None),
                plans.plan_key(q, k[:, :, :40], k[:, :, :40], True, 0.125, None, None)]
    assert len({base, *variants}) == 1 + len(variants)
    one = q[:, :, :1]
    assert plans.plan_key(one, k, k, True, 0.125, None, None) == plans.plan_key(one, k[:, :, :40], k[:, :, :40], True,
                                                                               0.125, None, None)
    assert isinstance(plans.select_config(None, 64, 32, 2), TileConfig)


def test_a_window_that_bounds_nothing_is_plain_attention(device):
    """Mistral's 4096 window on a shorter prompt: left >= Sk - 1 (and right >= Sq - 1 without causal) leaves every
    query its keys, so the plan is plain (kernels_used lists no window: the Gluon and TMA kernels may serve it),
    and the output is the windowed reference's. One key fewer and the window stays."""
    import flashpatch
    from flashpatch import ops
    from flashpatch.reference import reference_attention

    assert plans.window_bounds_nothing(True, (4095, 0), 2048, 2048)
    assert plans.window_bounds_nothing(True, (4095, -1), 4096, 4096)
    assert not plans.window_bounds_nothing(True, (4095, 0), 4097, 4097)
    assert plans.window_bounds_nothing(True, (-1, 0), 10, 10) is False  # no band at all: nothing to drop
    assert plans.window_bounds_nothing(False, (39, 29), 30, 40)
    assert not plans.window_bounds_nothing(False, (39, 28), 30, 40)
    assert plans.window_bounds_nothing(True, (39, 3), 50, 40)  # Sq > Sk: bottom-right, the first rows see none
    ops.reset_caches()
    q = torch.randn(1, 2, 30, 32, device=device)
    k, v = (torch.randn(1, 1, 40, 32, device=device) for _ in range(2))
    for window, kept in (((39, 0), False), ((38, 0), True)):
        out = flashpatch.attention(q, k, v, causal=True, window=window)
        ref = reference_attention(q.double(), k.double(), v.double(), causal=True, window=window)
        torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
        assert ("window" in flashpatch.kernels_used()[-1]["features"]) == kept
    ops.reset_caches()
