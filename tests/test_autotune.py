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


def test_prefill_tiles_are_tuned_per_length_bucket_on_gpus_only(monkeypatch):
    """A GPU prefill asks the tuner with its bucketed key and the family's candidates (the plan it makes keeps the
    answer); CPU tensors, float32 and short queries take the table row without timing anything."""
    import torch

    from flashpatch.kernels import AUTOTUNER, plans, select_config, tune_candidates

    class FakeQuery:  # what prefill_config reads of q
        def __init__(self, seq_q, is_cuda=True, dtype=torch.bfloat16):
            self.shape, self.is_cuda, self.dtype = (1, 8, seq_q, 128), is_cuda, dtype

        def element_size(self):
            return self.dtype.itemsize

    asked = []
    monkeypatch.setattr(AUTOTUNER, "pick", lambda family, key, candidates, timed: asked.append((key, candidates))
                        or candidates[-1])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert plans.prefill_config("sm90", FakeQuery(300), 300, True, None) == tune_candidates("sm90", 128)[-1]
    assert asked == [("d128-bfloat16-causal-q512-k512", tune_candidates("sm90", 128))]
    for query in (FakeQuery(300, is_cuda=False), FakeQuery(300, dtype=torch.float32), FakeQuery(16)):
        assert plans.prefill_config("sm90", query, 300, True, None) == select_config(
            "sm90", 128, query.shape[2], query.element_size())
    assert len(asked) == 1
