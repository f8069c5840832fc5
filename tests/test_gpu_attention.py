"""The op at real sizes on a GPU, in bf16 and fp16 (the interpreter cannot run bf16 dots)."""

import pytest
import torch

import flashpatch
from helpers import assert_fa2_rule, random_qkv

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_real_sizes(dtype, head_dim, causal, poison_empty):
    q, k, v = random_qkv(2, 16, 4, 1024, 1024, head_dim, dtype, "cuda")
    out = flashpatch.attention(q, k, v, causal=causal)
    assert_fa2_rule(out, q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seq_q,seq_k", [(1, 4097), (7, 2000), (333, 1777), (2047, 2047)])
def test_cache_shapes_with_padding(dtype, seq_q, seq_k, poison_empty):
    q, k, v = random_qkv(3, 32, 8, seq_q, seq_k, 128, dtype, "cuda")
    lengths = torch.randint(1, seq_k + 1, (3,), device="cuda")
    mask = torch.arange(seq_k, device="cuda")[None] >= seq_k - lengths[:, None]  # left padding
    out = flashpatch.attention(q, k, v, causal=True, key_padding_mask=mask)
    assert_fa2_rule(out, q, k, v, causal=True, key_padding_mask=mask)


def test_second_gpu_device_guard():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    q, k, v = random_qkv(1, 4, 4, 256, 256, 64, torch.bfloat16, "cuda:1")
    out = flashpatch.attention(q, k, v, causal=True)
    assert out.device == q.device
    assert_fa2_rule(out, q, k, v, causal=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("route", ["default", "portable"])
def test_backward_real_sizes(dtype, head_dim, causal, route, monkeypatch):
    """Through flashpatch.attention's autograd: the backward the route picks (on Hopper the Gluon sm90 backward for
    head dims up to 128) and the portable one (FLASHPATCH_SM90_BACKWARD=0), each named by kernels_used()."""
    from flashpatch import ops
    from flashpatch.kernels.plans import SM90_BACKWARD_SWITCH
    from flashpatch.reference import reference_attention

    monkeypatch.setattr(ops, "_reference_backward", lambda *a, **k: pytest.fail("PyTorch fallback ran"))
    if route == "portable":
        monkeypatch.setenv(SM90_BACKWARD_SWITCH, "0")
    ops.reset_caches()
    q, k, v = random_qkv(2, 16, 4, 1000, 1000, head_dim, dtype, "cuda")
    grad_out = torch.randn_like(q)

    def grads(fn, *tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        fn(*leaves, causal=causal).backward(grad_out.to(leaves[0].dtype))
        return [t.grad.double() for t in leaves]

    ours = grads(flashpatch.attention, q, k, v)
    ref = grads(reference_attention, q.double(), k.double(), v.double())
    same = grads(reference_attention, q, k, v)
    for g, r, s in zip(ours, ref, same):
        assert (g - r).abs().max() <= 2 * (s - r).abs().max() + 1e-2
    backward = [u for u in flashpatch.kernels_used() if u["kernel"].endswith("-backward")]
    sm90 = torch.cuda.get_device_capability()[0] == 9 and route == "default" and head_dim <= 128
    assert [u["kernel"] for u in backward] == ["gluon-sm90-backward" if sm90 else "portable-backward"], backward


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads_q,heads_k,head_dim", [(32, 32, 128), (9, 3, 64), (32, 8, 128), (16, 16, 256)])
@pytest.mark.parametrize("seq_q", [1, 4, 16])
def test_decode_kernel_real_sizes(dtype, heads_q, heads_k, head_dim, seq_q, poison_empty):
    seq_k = int(torch.randint(1000, 20000, ()))
    q, k, v = random_qkv(2, heads_q, heads_k, seq_q, seq_k, head_dim, dtype, "cuda")
    out = flashpatch.attention(q, k, v, causal=True)
    assert_fa2_rule(out, q, k, v, causal=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seq_q", [1, 8, 300])
def test_static_cache_lengths_on_device(dtype, seq_q, poison_empty):
    buffer = 4096
    q, k, v = random_qkv(3, 32, 8, seq_q, buffer, 128, dtype, "cuda")
    seqused = torch.randint(seq_q, buffer, (3,), device="cuda", dtype=torch.int32)
    k[:, :, -1] = 100.0  # what an unused slot holds must not matter
    out = flashpatch.attention(q, k, v, causal=True, seqused_k=seqused)
    assert_fa2_rule(out, q, k, v, causal=True, seqused_k=seqused)


def test_decode_step_replays_in_a_cuda_graph():
    """The used length lives on the device: one captured launch serves every later length."""
    q, k, v = random_qkv(1, 32, 8, 1, 2048, 128, torch.bfloat16, "cuda")
    seqused = torch.tensor([100], device="cuda", dtype=torch.int32)
    flashpatch.attention(q, k, v, causal=True, seqused_k=seqused)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = flashpatch.attention(q, k, v, causal=True, seqused_k=seqused)
    for used in (100, 1500, 2048):
        seqused.fill_(used)
        graph.replay()
        assert_fa2_rule(out.clone(), q, k[:, :, :used], v[:, :, :used], causal=True)


def test_cached_launches_respect_alignment_and_stride_classes(poison_empty):
    """After the first launch the compiled kernel is reused directly; a misaligned view or a stride of another
    divisibility class must get its own specialization, not the cached one."""
    q, k, v = random_qkv(1, 8, 8, 1, 3000, 64, torch.bfloat16, "cuda")
    flat = torch.randn(q.numel() + 1, device="cuda", dtype=torch.bfloat16)
    shifted = flat[1:].view(q.shape)  # 2-byte offset: not 16-byte aligned
    odd_k = torch.randn(1, 8, 3000, 72, device="cuda", dtype=torch.bfloat16)[..., :64]  # row stride 72
    for query, key in ((q, k), (q, k), (shifted, k), (q, odd_k), (shifted, odd_k), (q, k)):
        out = flashpatch.attention(query, key, v, causal=True)
        assert_fa2_rule(out, query, key, v, causal=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_segments_forward_and_backward(dtype):
    from test_packed import packed_segments

    from flashpatch.reference import reference_attention

    q, k, v = random_qkv(2, 16, 4, 2048, 2048, 128, dtype, "cuda")
    segments = packed_segments(2, 2048, "cuda")
    out = flashpatch.attention(q, k, v, causal=True, segment_ids=segments)
    assert_fa2_rule(out, q, k, v, causal=True, segment_ids=segments)
    grad_out = torch.randn_like(q)

    def grads(fn, *tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        fn(*leaves, causal=True, segment_ids=segments).backward(grad_out.to(leaves[0].dtype))
        return [t.grad.double() for t in leaves]

    ours, ref, same = (grads(flashpatch.attention, q, k, v), grads(reference_attention, q.double(), k.double(), v.double()),
                       grads(reference_attention, q, k, v))
    for g, r, s in zip(ours, ref, same):
        assert (g - r).abs().max() <= 2 * (s - r).abs().max() + 1e-2


@pytest.mark.parametrize("family", ["sm90", "sm80", "sm86"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_every_table_row_and_tune_candidate_compiles_fits_and_is_correct(family, head_dim, monkeypatch):
    """Evidence for GPUs this suite may not run on: each family's forward rows and autotune candidates compile
    here, their compiled shared memory fits that family's budget, and they compute the right thing."""
    from flashpatch.kernels import flash_attn_forward
    from flashpatch.kernels.config import tune_candidates
    from flashpatch.kernels.forward import _launch_forward
    from flashpatch.kernels.forward_tma import COMPILED
    from test_dispatch import SMEM

    monkeypatch.delenv("FLASHPATCH_TMA", raising=False)
    q, k, v = random_qkv(2, 8, 4, 700, 700, head_dim, torch.bfloat16, "cuda")
    for cfg in tune_candidates(family, head_dim):
        out, _ = flash_attn_forward(q, k, v, causal=True, scale=head_dim ** -0.5, key_padding_mask=None, config=cfg)
        assert_fa2_rule(out, q, k, v, causal=True)
        if cfg.tma:  # the tensor-descriptor kernel (Hopper only: no other family lists it)
            compiled = COMPILED[(cfg.block_m, cfg.block_n, head_dim, True, cfg.num_warps, cfg.num_stages,
                                 cfg.warp_specialize)]
            shared = [compiled.metadata.shared]
        else:
            options = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                           num_stages=cfg.num_stages)
            shared = [compiled.metadata.shared
                      for compiled in _launch_forward.variants(torch.bfloat16, **options, BLOCK_D=head_dim)]
        assert shared and max(shared) <= SMEM[family], (family, cfg, shared)


@pytest.mark.parametrize("family", ["sm90", "sm80", "sm86"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_every_backward_row_compiles_fits_and_is_correct(family, head_dim, monkeypatch):
    """The backward's rows for each family compile here, fit that family's shared memory (compiled metadata)
    and give gradients within FA2's rule."""
    from flashpatch.kernels import BACKWARD_TABLE, flash_attn_backward, flash_attn_forward, select_config
    from flashpatch.kernels import backward as bwd
    from flashpatch.reference import reference_attention
    from test_dispatch import SMEM

    for launcher in (bwd._launch_dkdv, bwd._launch_dq):
        monkeypatch.setattr(launcher, "compiled", {})  # compile afresh, so that this row's metadata is read

    q, k, v = random_qkv(2, 8, 4, 300, 333, head_dim, torch.bfloat16, "cuda")
    grad_out = torch.randn_like(q)
    scale = head_dim ** -0.5
    out, lse = flash_attn_forward(q, k, v, causal=True, scale=scale, key_padding_mask=None,
                                  config=select_config(family, head_dim, 300))
    ours = flash_attn_backward(grad_out, q, k, v, out, lse, causal=True, scale=scale, key_padding_mask=None,
                               config=BACKWARD_TABLE[family][head_dim])
    shared = [compiled.metadata.shared for launcher in (bwd._launch_dkdv, bwd._launch_dq)
              for compiled, _ in launcher.compiled.values()]
    assert len(shared) == 2 and max(shared) <= SMEM[family], (family, head_dim, shared)

    def grads(fn, *inputs):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        fn(*leaves, causal=True).backward(grad_out.to(leaves[0].dtype))
        return [t.grad for t in leaves]

    ref = grads(reference_attention, q.double(), k.double(), v.double())
    same = grads(reference_attention, q, k, v)
    for name, g, r, s in zip("qkv", ours, ref, same):
        assert (g.double() - r).abs().max() <= 2 * (s.double() - r).abs().max() + 1e-2, name


def test_split_merge_sees_every_split_on_the_gpu(poison_empty):
    """The decode kernel's last-arriving split merges the others' partials, read across SMs: hundreds of
    launches, alternating inputs so a stale partial from the previous launch would show, must each give the
    same bits as the first launch on that input, and agree with the unsplit kernel."""
    from flashpatch.kernels import TileConfig, flash_decode_forward

    inputs = [random_qkv(2, 32, 8, 1, 16384, 128, torch.bfloat16, "cuda") for _ in range(2)]
    run = dict(causal=True, scale=128 ** -0.5, key_padding_mask=None, seqused_k=None, config=TileConfig(16, 64, 4, 3))
    firsts = [flash_decode_forward(*qkv, num_splits=64, need_lse=False, **run)[0] for qkv in inputs]
    for qkv, first in zip(inputs, firsts):
        unsplit, _ = flash_decode_forward(*qkv, num_splits=1, **run)
        assert (first.float() - unsplit.float()).abs().max() < 2e-2
        assert_fa2_rule(first, *qkv, causal=True)
    outs = [flash_decode_forward(*inputs[i % 2], num_splits=64, need_lse=False, **run)[0] for i in range(400)]
    assert all(torch.equal(out, firsts[i % 2]) for i, out in enumerate(outs))


@pytest.mark.parametrize("warm_first", [False, True])
def test_split_decode_in_a_captured_cuda_graph(warm_first, monkeypatch):
    """A split decode captured by torch.cuda.graph: with no counter buffer yet for the stream, the capture uses a
    per-call zeroed one (nothing may be allocated outside the graph mid-capture); after an eager warm-up it uses
    the cached one, which every replay leaves at zero. Replays on new inputs match eager launches bit for bit."""
    from flashpatch.kernels import TileConfig, decode, flash_decode_forward

    monkeypatch.setattr(decode, "_SPLIT_BUFFERS", {})
    q, k, v = random_qkv(1, 32, 8, 1, 8192, 128, torch.bfloat16, "cuda")
    run = dict(causal=True, scale=128 ** -0.5, key_padding_mask=None, seqused_k=None, config=TileConfig(16, 64, 4, 3),
               num_splits=16, need_lse=False)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        if warm_first:
            flash_decode_forward(q, k, v, **run)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out, _ = flash_decode_forward(q, k, v, **run)
    assert bool(decode._SPLIT_BUFFERS) == warm_first
    for _ in range(3):
        fresh = random_qkv(1, 32, 8, 1, 8192, 128, torch.bfloat16, "cuda")
        for static, new in zip((q, k, v), fresh):
            static.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, flash_decode_forward(*fresh, **run)[0])
    assert all(not c.any() for c, _ in decode._SPLIT_BUFFERS.values())


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_float32_rows_compile_fit_every_family_and_are_correct(head_dim, poison_empty):
    """float32 has its own forward and decode rows for every family: they compile here, their compiled shared
    memory fits the smallest family's budget (sm86), and the results are right."""
    from flashpatch.kernels import flash_attn_forward, flash_decode_forward, select_config, select_decode_config
    from flashpatch.kernels.decode import _launch_decode
    from flashpatch.kernels.forward import _launch_forward
    from test_dispatch import SMEM

    q, k, v = random_qkv(2, 8, 4, 300, 333, head_dim, torch.float32, "cuda")
    cfg = select_config("sm90", head_dim, 300, element_size=4)
    out, _ = flash_attn_forward(q, k, v, causal=True, scale=head_dim ** -0.5, key_padding_mask=None, config=cfg)
    assert_fa2_rule(out, q, k, v, causal=True)
    group = 128 * 128 * 2 // (head_dim * 4)  # the largest GQA group the decode kernel takes at float32
    q1, k1, v1 = random_qkv(1, 2 * group, 2, 1, 3000, head_dim, torch.float32, "cuda")
    dcfg = select_decode_config("sm90", head_dim, element_size=4)
    out1, _ = flash_decode_forward(q1, k1, v1, causal=True, scale=head_dim ** -0.5, key_padding_mask=None,
                                   seqused_k=None, config=dcfg, num_splits=3)
    assert_fa2_rule(out1, q1, k1, v1, causal=True)
    shared = [c.metadata.shared for c in _launch_forward.variants(torch.float32, BLOCK_M=cfg.block_m,
                                                                   BLOCK_N=cfg.block_n, BLOCK_D=head_dim)]
    shared += [c.metadata.shared for c in _launch_decode.variants(torch.float32, BLOCK_N=dcfg.block_n,
                                                                   BLOCK_D=head_dim, BLOCK_R=group)]
    assert len(shared) >= 2 and max(shared) <= SMEM["sm86"], shared


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_plans_route_plain_calls_to_the_gluon_forward_on_hopper(causal, head_dim, monkeypatch, poison_empty):
    """On sm90 the Gluon forward is an autotuning candidate of plain 16-bit calls; chosen, its
    plan serves them
    (forward and the lse the backward reads), and a view its descriptors can't take runs the pointer kernel."""
    from flashpatch import ops
    from flashpatch.kernels import AUTOTUNER, forward_sm90, plans

    if torch.cuda.get_device_capability()[0] != 9 or not forward_sm90.HAS_GLUON:
        pytest.skip("needs a Hopper GPU and Triton's Gluon")
    ops.reset_caches()
    monkeypatch.delenv(plans.GLUON_SWITCH, raising=False)
    monkeypatch.setattr(AUTOTUNER, "pick", lambda family, key, candidates, timed: next(
        c for c in candidates if isinstance(c, forward_sm90.Sm90Config)))
    q = torch.randn(2, 700, 8, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)  # transformers' layout
    k, v = (torch.randn(2, 900, 2, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    out = flashpatch.attention(q, k, v, causal=causal)
    assert_fa2_rule(out, q, k, v, causal=causal)
    (plan,) = plans.PLANS.plans.values()
    assert isinstance(plan, plans.Sm90Plan)
    q.requires_grad_()
    flashpatch.attention(q, k, v, causal=causal).float().sum().backward()
    assert torch.isfinite(q.grad).all()
    with torch.no_grad():  # the same strides 2 bytes off a 16-byte boundary: the plan's kind, not TMA-legal
        shifted = torch.empty(q.numel() + 8, device="cuda", dtype=q.dtype)[1:1 + q.numel()]
        shifted = shifted.view(2, 700, 8, head_dim).transpose(1, 2).copy_(q)
        assert_fa2_rule(flashpatch.attention(shifted, k, v, causal=causal), shifted, k, v, causal=causal)
    assert len(plans.PLANS) == 2  # the inference plan (served the shifted call too) and the training one


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_window_softcap_sinks_real_sizes(dtype, causal, poison_empty):
    """Mistral's window with left padding and GQA, Gemma 2's softcap, gpt-oss' sinks on a windowed layer, each at
    real sizes and head dims, forward and (softcap, sinks) backward against float64."""
    from flashpatch.reference import reference_attention

    batch, seq = 2, 1500
    q, k, v = random_qkv(batch, 16, 4, seq, seq, 128, dtype, "cuda")
    lengths = torch.tensor([seq, 977], device="cuda")
    mask = torch.arange(seq, device="cuda")[None] >= seq - lengths[:, None]
    sinks = torch.randn(16, device="cuda") * 2
    for kw in (dict(key_padding_mask=mask, window=(511, 0)), dict(softcap=50.0), dict(window=(127, 0), sinks=sinks)):
        kw["causal"] = causal
        assert_fa2_rule(flashpatch.attention(q, k, v, **kw), q, k, v, **kw)
    q, k, v = random_qkv(1, 8, 2, 700, 700, 256, dtype, "cuda")  # Gemma 2's head dim
    sinks = sinks[:8]
    for kw in (dict(causal=causal, softcap=30.0, window=(255, 0)), dict(causal=causal, sinks=sinks)):
        grad_out = torch.randn_like(q)
        tensors = (q, k, v) + ((kw["sinks"],) if "sinks" in kw else ())

        def grads(fn, tensors):
            leaves = [t.detach().clone().requires_grad_() for t in tensors]
            call_kw = dict(kw, sinks=leaves[3]) if "sinks" in kw else kw
            fn(*leaves[:3], **call_kw).backward(grad_out.to(leaves[0].dtype))
            return [t.grad.double() for t in leaves]

        ours = grads(flashpatch.attention, tensors)
        ref = grads(reference_attention, [t.double() for t in tensors])
        same = grads(reference_attention, tensors)
        for name, g, r, s in zip("q k v sinks".split(), ours, ref, same):
            assert (g - r).abs().max() <= 2 * (s - r).abs().max() + 1e-2, f"d{name}"


def test_kernels_used_names_why_a_call_is_not_on_the_gluon_forward():
    from flashpatch import ops

    ops.reset_caches()
    q, k, v = random_qkv(2, 8, 2, 512, 512, 128, torch.bfloat16, "cuda")
    flashpatch.attention(q, k, v, causal=True)
    flashpatch.attention(q, k, v, causal=False, window=(127, 16))  # reaches ahead: not one the Gluon kernel takes
    plain, windowed = flashpatch.kernels_used()
    assert plain["kernel"] in ("portable", "tma", "gluon-sm90") and windowed["kernel"] == "portable"
    assert (plain["why_not_gluon"] is None) == (plain["kernel"] == "gluon-sm90")
    assert windowed["why_not_gluon"].startswith(("a sliding window", "not a Hopper"))


def test_untuned_hopper_calls_run_the_gluon_forward(monkeypatch):
    """FLASHPATCH_AUTOTUNE=0 (the suite's default) runs the first candidate: on Hopper the Gluon kernel's default
    config, not the portable kernel's table row."""
    from flashpatch import ops
    from flashpatch.kernels.forward_sm90 import SM90_CONFIGS
    from helpers import HOPPER

    if not HOPPER:
        pytest.skip("the Gluon sm90 forward needs an sm90 GPU")
    monkeypatch.setenv("FLASHPATCH_AUTOTUNE", "0")
    ops.reset_caches()
    for head_dim in (64, 128):
        q, k, v = random_qkv(2, 8, 2, 700, 700, head_dim, torch.bfloat16, "cuda")
        assert_fa2_rule(flashpatch.attention(q, k, v, causal=True), q, k, v, causal=True)
    used = flashpatch.kernels_used()
    assert [(u["kernel"], u["tile"]) for u in used] == [("gluon-sm90", SM90_CONFIGS[d][0].label()) for d in (64, 128)]
    ops.reset_caches()


@pytest.mark.parametrize("head_dim,features", [(128, dict(window=(300, 0))), (256, dict(softcap=2.0)),
                                               (256, dict(window=(200, 0), softcap=2.0)), (64, dict(window=(0, 0))),
                                               (64, dict(sinks=True)), (64, dict(sinks=True, window=(127, 0)))])
def test_gluon_features_through_the_op(head_dim, features, monkeypatch):
    """The autotuner made to pick a Gluon config (as it does untuned): a causal windowed, softcapped or sink call is
    served by the Gluon sm90 forward (kernels_used says so) within FA2's rule."""
    from flashpatch import ops
    from flashpatch.kernels import AUTOTUNER, TileConfig, plans
    from helpers import HOPPER

    if not HOPPER:
        pytest.skip("the Gluon sm90 forward needs an sm90 GPU")
    monkeypatch.delenv(plans.GLUON_FEATURES_SWITCH, raising=False)
    monkeypatch.setenv("FLASHPATCH_AUTOTUNE", "1")
    monkeypatch.setattr(AUTOTUNER, "pick", lambda family, key, candidates, timed: next(
        c for c in candidates if not isinstance(c, TileConfig)))
    ops.reset_caches()
    q, k, v = random_qkv(2, 8, 4, 1000, 1000, head_dim, torch.bfloat16, "cuda")
    q, k = q * 4, k * 4  # scores that reach a cap of 2
    if features.get("sinks"):
        features = dict(features, sinks=torch.randn(8, device="cuda") * 2)
    out = flashpatch.attention(q, k, v, causal=True, **features)
    (used,) = flashpatch.kernels_used()
    assert used["kernel"] == "gluon-sm90", used
    assert_fa2_rule(out, q, k, v, causal=True, **features)
    ops.reset_caches()
