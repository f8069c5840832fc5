"""Kernel-path dispatch and tile tables: pure functions of capability, head dim and lengths."""

import json
from dataclasses import asdict

import pytest
from typer.testing import CliRunner

from flashpatch.cli.main import app
from flashpatch.dispatch import path_for_capability, triton_too_old
from flashpatch.kernels.config import (BACKWARD_TABLE, DECODE_SPLIT_MAX_ROWS, DECODE_SPLIT_TABLE, DECODE_TABLE, FP32_FORWARD, TILE_TABLE,
                                       backward_smem, decode_split_config, decode_splits, gpu_family, head_dim_bucket, select_backward_config,
                                       select_config, select_decode_config, tune_candidates, uses_decode_kernel)

# Shared memory per block each family may use (bytes): H100 227 KB, A100 163 KB, sm86/89 99 KB.
SMEM = {"sm90": 227 * 1024, "sm80": 163 * 1024, "sm86": 99 * 1024}


@pytest.mark.parametrize("capability,family", [((9, 0), "sm90"), ((8, 0), "sm80"), ((8, 6), "sm86"),
                                               ((8, 9), "sm86"), ((7, 5), None), ((7, 0), None)])
def test_family_by_capability(capability, family):
    assert gpu_family(capability) == family
    path = path_for_capability(capability)
    assert path.usable == (family is not None)
    if family is None:
        assert "older than sm80" in path.reason


def test_triton_too_old_is_a_named_fallback():
    assert "older than 3.6" in triton_too_old("3.5.1")
    assert "older than 3.6" in triton_too_old("2.3.0")
    assert triton_too_old("3.6.0") is None and triton_too_old("3.10.0+git1234") is None


def test_fallback_reasons_are_named():
    assert "Triton unavailable" in path_for_capability((9, 0), triton_error="ImportError: no triton").reason
    assert "TRITON_INTERPRET=1" in path_for_capability(None).reason
    assert path_for_capability(None, interpreter=True).name == "triton-interpreter"
    assert not path_for_capability((9, 0), interpreter=True).usable


@pytest.mark.parametrize("family", list(TILE_TABLE))
def test_forward_tiles_fit_shared_memory(family):
    for head_dim, cfg in TILE_TABLE[family].items():
        # q tile once, k and v tiles per pipeline stage, 2 bytes per element
        smem = (cfg.block_m + 2 * cfg.num_stages * cfg.block_n) * head_dim * 2
        assert smem <= SMEM[family], (family, head_dim, cfg, smem)


@pytest.mark.parametrize("family", list(DECODE_TABLE))
def test_decode_tiles_fit_shared_memory(family):
    for head_dim, cfg in DECODE_TABLE[family].items():
        rows = max(r for r in (16, 32, 64, 128) if uses_decode_kernel(1, r, head_dim, 0.0))  # the largest tile served
        smem = (rows + 2 * cfg.num_stages * cfg.block_n) * head_dim * 2
        assert smem <= SMEM[family], (family, head_dim, cfg, rows, smem)
    assert not uses_decode_kernel(17, 1, 64, 0.0) and not uses_decode_kernel(1, 1, 64, 0.1)


@pytest.mark.parametrize("family", list(TILE_TABLE))
def test_float32_rows_fit_every_family_at_four_bytes(family):
    for head_dim in (64, 128, 256):
        cfg = select_config(family, head_dim, 4096, element_size=4)
        assert cfg == FP32_FORWARD[head_dim]
        assert (cfg.block_m + 2 * cfg.num_stages * cfg.block_n) * head_dim * 4 <= SMEM[family], (family, cfg)
        dcfg = select_decode_config(family, head_dim, element_size=4)
        rows = max(r for r in (16, 32, 64, 128) if uses_decode_kernel(1, r, head_dim, 0.0, element_size=4))
        assert (rows + 2 * dcfg.num_stages * dcfg.block_n) * head_dim * 4 <= SMEM[family], (family, dcfg, rows)
    assert select_config(family, 64, 4096, element_size=2) == TILE_TABLE[family][64]


def test_tma_candidates_join_on_hopper_unless_switched_off(monkeypatch):
    monkeypatch.delenv("FLASHPATCH_TMA", raising=False)
    assert any(c.tma for c in tune_candidates("sm90", 128)) and not any(c.tma for c in tune_candidates("sm80", 128))
    monkeypatch.setenv("FLASHPATCH_TMA", "0")
    assert not any(c.tma for c in tune_candidates("sm90", 128))


@pytest.mark.parametrize("family", list(TILE_TABLE))
def test_tune_candidates_fit_shared_memory_and_start_with_the_table_row(family, monkeypatch):
    monkeypatch.delenv("FLASHPATCH_TMA", raising=False)
    for head_dim, row in TILE_TABLE[family].items():
        candidates = tune_candidates(family, head_dim)
        assert candidates[0] == row and len(set(candidates)) == len(candidates)
        for cfg in candidates:
            assert (cfg.block_m + 2 * cfg.num_stages * cfg.block_n) * head_dim * 2 <= SMEM[family], (family, cfg)


def test_fp8_tiles_fit_hopper_shared_memory():
    from flashpatch.kernels import FP8_TABLE

    for head_dim, candidates in FP8_TABLE["sm90"].items():
        for cfg in candidates:  # Q tile plus pipelined K and V tiles, one byte per element
            assert (cfg.block_m + 2 * cfg.num_stages * cfg.block_n) * head_dim <= SMEM["sm90"], (head_dim, cfg)


@pytest.mark.parametrize("family", list(BACKWARD_TABLE))
def test_backward_tiles_fit_shared_memory(family):
    assert set(BACKWARD_TABLE[family]) == {64, 128, 256}
    for head_dim, cfg in BACKWARD_TABLE[family].items():
        assert backward_smem(cfg, head_dim) <= SMEM[family], (family, head_dim, cfg)
        assert 2 * backward_smem(select_backward_config(family, head_dim, 4), head_dim) <= SMEM[family]


@pytest.mark.parametrize("head_dim,bucket", [(8, 64), (64, 64), (80, 128), (128, 128), (160, 256), (256, 256)])
def test_head_dim_buckets(head_dim, bucket):
    assert head_dim_bucket(head_dim) == bucket


def test_short_queries_get_a_short_tile():
    assert select_config("sm90", 128, 1).block_m == 16
    assert select_config("sm90", 128, 4096).block_m == TILE_TABLE["sm90"][128].block_m
    assert select_config(None, 128, 4096).block_m == 32  # interpreter


def test_splits_keep_two_key_blocks_and_one_wave():
    for seq_k in (1, 63, 64, 127, 128, 1000, 4096, 16383, 16384, 1 << 17):
        for batch_heads in (1, 8, 32, 131, 132, 4096):
            s = decode_splits(batch_heads, 1, seq_k, 64, 132)
            assert 1 <= s <= max(1, seq_k // 128)  # two 64-key blocks per split at least
            assert s == 1 or s * batch_heads <= 132


def test_info_json_names_the_path():
    result = CliRunner().invoke(app, ["info", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert data["versions"]["torch"] and data["kernel_path"]["name"]
    assert data["kernel_path"]["reason"]


def test_info_prints_every_table_for_the_gpu_family(monkeypatch):
    import flashpatch.info as info

    monkeypatch.setattr(info, "path_for_device", lambda device: path_for_capability((9, 0)))
    monkeypatch.delenv("FLASHPATCH_TMA", raising=False)
    data = info.gather_info()
    assert data["backward_tiles"]["head_dim<=128"]["dkdv"] == asdict(BACKWARD_TABLE["sm90"][128].dkdv)
    assert any(c["tma"] for c in data["tune_candidates"]["head_dim<=128"])
    result = CliRunner().invoke(app, ["info"], terminal_width=200)
    assert result.exit_code == 0
    assert "backward tiles head_dim<=64" in result.output and "tma=True" in result.output
    assert "fp8 tiles head_dim=128" in result.output and data["fp8_tiles"]["head_dim=64"]
    backward = data["sm90_gluon_backward"]
    assert set(backward["config"]) == {"head_dim=64", "head_dim=80", "head_dim=96", "head_dim=128"}
    assert backward["switch"].startswith("FLASHPATCH_SM90_BACKWARD=0")


def test_unusable_reason_is_marked_constant_as_assume_constant_result_would():
    """dispatch.py marks it by hand (the decorator would import torch._dynamo and Triton at import time)."""
    import torch

    from flashpatch.dispatch import unusable_reason

    marked = torch.compiler.assume_constant_result(lambda: None)
    assert set(vars(marked)) == {"_dynamo_marked_constant"} and marked._dynamo_marked_constant is True
    assert unusable_reason._dynamo_marked_constant is True


def test_importing_the_cli_leaves_triton_unimported():
    """The CLI sets TRITON_INTERPRET on a CPU machine after it is imported: Triton's language must not be loaded
    by then, or the interpreter cannot run the kernels (`make demo` broke this way)."""
    import subprocess
    import sys

    code = "import sys, flashpatch.cli.main; print('triton.language' in sys.modules)"
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_split_decode_launches_take_their_own_tile_and_others_the_rows():
    """Split launches (one program per SM) may use another tile than the table row, which the launches with a
    program per (batch, head) keep; the split count still follows the row's key block and each split's length is a
    whole number of the split tile's blocks. float32, families without an entry and tiles of many rows keep the row
    everywhere; the split tile fits shared memory at the most rows it serves."""
    import torch

    from flashpatch.kernels import DecodePlan, TileConfig

    for family, rows in DECODE_SPLIT_TABLE.items():
        for head_dim, tile in rows.items():
            assert decode_split_config(family, head_dim, 16) == tile != DECODE_TABLE[family][head_dim]
            assert decode_split_config(family, head_dim, 16, element_size=4) is None
            assert decode_split_config(family, head_dim, 2 * DECODE_SPLIT_MAX_ROWS) is None
            smem = (DECODE_SPLIT_MAX_ROWS + 2 * tile.num_stages * tile.block_n) * head_dim * 2
            assert smem <= SMEM[family], (family, head_dim, tile, smem)
    assert decode_split_config(None, 128, 16) is None and decode_split_config("sm86", 128, 16) is None
    config, split = TileConfig(16, 64, 4, 4), TileConfig(16, 128, 8, 3)
    plan = DecodePlan((1, 8, 1, 128), (1024, 128, 128, 1), 8, torch.bfloat16, causal=True, scale=0.1,
                      has_kpm=False, has_seqused=False, config=config, sm_count=132, split_config=split)
    assert {k: plan.constexprs[True][k] for k in ("BLOCK_N", "num_warps", "num_stages")} == \
        {"BLOCK_N": 128, "num_warps": 8, "num_stages": 3}
    assert {k: plan.constexprs[False][k] for k in ("BLOCK_N", "num_warps", "num_stages")} == \
        {"BLOCK_N": 64, "num_warps": 4, "num_stages": 4}
    # 8 (batch, head) pairs on 132 SMs: 16 splits by the row's 64-key blocks, each 1024 keys (8 split blocks)
    (grid, split_len, partials) = plan._layout(16384)
    assert grid == (16, 8, 1) and split_len == 1024 and partials > 0
    # a 1K cache: 8 splits of 128 keys by the row's blocks, one split block each
    assert plan._layout(1024)[:2] == ((8, 8, 1), 128)
    (grid, split_len, partials) = plan._layout(100)  # too short to split: one program per pair, the row's tile
    assert grid[0] == 1 and partials == 0
    plain = DecodePlan((1, 8, 1, 128), (1024, 128, 128, 1), 8, torch.bfloat16, causal=True, scale=0.1,
                       has_kpm=False, has_seqused=False, config=config, sm_count=132)
    assert plain.constexprs[True]["num_warps"] == plain.constexprs[False]["num_warps"] == 4


def test_a_decode_plan_names_its_split_tile(monkeypatch):
    """kernels_used() gives a decode plan's row and, where split launches take another tile, that one too."""
    import torch

    from flashpatch.kernels import TileConfig, plans

    q, k = torch.zeros(1, 8, 1, 128, dtype=torch.bfloat16), torch.zeros(1, 8, 64, 128, dtype=torch.bfloat16)
    call = dict(causal=True, scale=0.1, key_padding_mask=None, dropout_p=0.0, seed=0, seqused_k=None,
                segment_ids=None, need_lse=False, sm_count=132)
    plan = plans.make_plan(q, k, k, family="sm90", **call)
    assert plan.split_config == TileConfig(16, 128, 8, 3)
    assert plan.call["tile"] == "m16n64w4s4 (split launches m16n128w8s3)"
    assert plans.make_plan(q, k, k, family="sm86", **call).call["tile"] == DECODE_TABLE["sm86"][128].label()
