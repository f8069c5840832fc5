"""Autotuning among the tile table's candidates: the choice, the disk cache across processes, the switch."""

import json

import pytest

from flashpatch.kernels.autotune import Autotuner, cache_file, tune_key
from flashpatch.kernels.config import TileConfig

CANDIDATES = [TileConfig(128, 64, 8, 3), TileConfig(128, 128, 8, 3), TileConfig(64, 64, 4, 3)]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHPATCH_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FLASHPATCH_AUTOTUNE", raising=False)
    return tmp_path


def timer(ms_by_config, calls):
    def time_ms(cfg):
        calls.append(cfg)
        return ms_by_config[cfg]
    return time_ms


def test_picks_the_fastest_and_remembers_it_across_processes():
    calls = []
    fastest = CANDIDATES[2]
    times = {CANDIDATES[0]: 2.0, CANDIDATES[1]: 3.0, fastest: 1.5}
    key = tune_key(64, "bfloat16", True, 3000, 3000)
    assert Autotuner().pick("sm90", key, CANDIDATES, timer(times, calls)) == fastest
    assert calls == CANDIDATES
    on_disk = json.load(open(cache_file("sm90")))
    assert on_disk[key] == {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3, "tma": False,
                            "warp_specialize": False}
    again = []  # a new process: read from disk, nothing timed
    assert Autotuner().pick("sm90", key, CANDIDATES, timer(times, again)) == fastest and again == []
    del on_disk[key]["tma"], on_disk[key]["warp_specialize"]  # a cache written before those fields still reads
    json.dump(on_disk, open(cache_file("sm90"), "w"))
    assert Autotuner().pick("sm90", key, CANDIDATES, timer(times, again)) == fastest and again == []


def test_keys_bucket_lengths_and_separate_dtype_and_causality():
    assert tune_key(128, "bfloat16", True, 3000, 3000) == tune_key(128, "bfloat16", True, 4096, 2049)
    assert tune_key(128, "bfloat16", True, 3000, 3000) != tune_key(128, "bfloat16", True, 5000, 3000)
    assert tune_key(128, "bfloat16", True, 100, 100) != tune_key(128, "float16", True, 100, 100)
    assert tune_key(128, "bfloat16", True, 100, 100) != tune_key(128, "bfloat16", False, 100, 100)


def test_switched_off_uses_the_table_row_without_timing(monkeypatch):
    monkeypatch.setenv("FLASHPATCH_AUTOTUNE", "0")
    calls = []
    assert Autotuner().pick("sm90", "k", CANDIDATES, timer({}, calls)) == CANDIDATES[0] and calls == []


def test_a_failing_candidate_is_never_chosen_and_a_broken_cache_is_retuned(cache_dir):
    def time_ms(cfg):
        if cfg is CANDIDATES[2]:
            raise RuntimeError("out of resources")
        return {CANDIDATES[0]: 2.0, CANDIDATES[1]: 1.0}[cfg]

    open(cache_file("sm80"), "w").write("{not json")
    with pytest.warns(UserWarning, match="failed to run"):
        assert Autotuner().pick("sm80", "k", CANDIDATES, time_ms) == CANDIDATES[1]


def test_prefill_calls_remember_the_tile_chosen_for_their_shape(monkeypatch):
    """A prefill's tile choice is worked out once per (shape, dtype, causal, switches) and then looked up; a
    changed switch or another length asks the tuner again."""
    import torch

    from flashpatch import ops
    from flashpatch.kernels import AUTOTUNER

    class FakeCudaQuery:  # what _prefill_config reads of q, as a CUDA tensor would answer
        dtype, is_cuda = torch.bfloat16, True

        def __init__(self, seq_q):
            self.shape = (1, 8, seq_q, 128)

        def element_size(self):
            return 2

    asked = []
    monkeypatch.setattr(AUTOTUNER, "pick", lambda family, key, candidates, time_ms: asked.append(key) or
                        candidates[len(asked) % len(candidates)])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(ops, "_PREFILL_CONFIGS", {})
    first = ops._prefill_config("sm90", FakeCudaQuery(300), 300, True, None)
    assert ops._prefill_config("sm90", FakeCudaQuery(300), 300, True, None) == first and len(asked) == 1
    ops._prefill_config("sm90", FakeCudaQuery(301), 301, True, None)
    ops._prefill_config("sm90", FakeCudaQuery(300), 300, False, None)
    assert len(asked) == 3
    monkeypatch.setenv("FLASHPATCH_TMA", "0")
    ops._prefill_config("sm90", FakeCudaQuery(300), 300, True, None)
    assert len(asked) == 4
