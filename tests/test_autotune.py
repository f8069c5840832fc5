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
    tuner = Autotuner()
    assert tuner.pick("sm90", key, CANDIDATES, timer(times, calls)) == fastest
    assert calls == CANDIDATES
    assert tuner.describe("sm90", key) == {"bucket": key, "timed_ms": {c.label(): times[c] for c in CANDIDATES}}
    on_disk = json.load(open(cache_file("sm90")))
    assert on_disk[key] == {"kernel": "TileConfig", "block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3,
                            "tma": False, "warp_specialize": False}
    again, reader = [], Autotuner()  # a new process: read from disk, nothing timed
    assert reader.pick("sm90", key, CANDIDATES, timer(times, again)) == fastest and again == []
    assert reader.describe("sm90", key) == {"bucket": key, "timed_ms": None}
    for field in ("kernel", "tma", "warp_specialize"):  # a cache written before those fields still reads
        del on_disk[key][field]
    json.dump(on_disk, open(cache_file("sm90"), "w"))
    assert Autotuner().pick("sm90", key, CANDIDATES, timer(times, again)) == fastest and again == []


def test_a_remembered_choice_outside_the_candidates_is_timed_afresh():
    """A choice on disk that this call cannot take (another checkout's cache, a kernel switched off since) never
    serves it: the candidates are timed and the new choice replaces it."""
    key = tune_key(128, "bfloat16", True, 512, 512)
    Autotuner().pick("sm90", key, CANDIDATES[1:], timer({CANDIDATES[1]: 1.0, CANDIDATES[2]: 2.0}, []))
    calls = []
    times = {CANDIDATES[0]: 1.0, CANDIDATES[2]: 2.0}
    assert Autotuner().pick("sm90", key, [CANDIDATES[0], CANDIDATES[2]], timer(times, calls)) == CANDIDATES[0]
    assert calls == [CANDIDATES[0], CANDIDATES[2]]
    assert Autotuner().pick("sm90", key, [CANDIDATES[0], CANDIDATES[2]], timer(times, calls)) == CANDIDATES[0]
    assert len(calls) == 2


def test_keys_bucket_lengths_and_separate_dtype_and_causality():
    assert tune_key(128, "bfloat16", True, 3000, 3000) == tune_key(128, "bfloat16", True, 4096, 2049)
    assert tune_key(128, "bfloat16", True, 3000, 3000) != tune_key(128, "bfloat16", True, 5000, 3000)
    assert tune_key(128, "bfloat16", True, 100, 100) != tune_key(128, "float16", True, 100, 100)
    assert tune_key(128, "bfloat16", True, 100, 100) != tune_key(128, "bfloat16", False, 100, 100)
    # batch x heads: a batch-1 prefill and a batch-8 call of 32 heads fill the SMs differently
    assert tune_key(128, "bfloat16", True, 2048, 2048, 32) != tune_key(128, "bfloat16", True, 2048, 2048, 256)
    assert tune_key(128, "bfloat16", True, 2048, 2048, 200) == tune_key(128, "bfloat16", True, 2048, 2048, 256)


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


def test_prefill_tiles_are_tuned_per_length_bucket_and_call_kind(monkeypatch):
    """A GPU prefill asks the tuner with its bucketed key (masked calls apart: their candidates differ) and keeps
    what it picks; while a CUDA graph is being captured nothing is timed and the first candidate serves."""
    import torch

    from flashpatch.kernels import AUTOTUNER, plans, tune_candidates

    class FakeQuery:  # what prefill_config reads of q
        shape, dtype = (1, 8, 300, 128), torch.bfloat16

    asked = []
    monkeypatch.setattr(AUTOTUNER, "pick", lambda family, key, candidates, timed: asked.append(key) or candidates[-1])
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    candidates = tune_candidates("sm90", 128)
    config, tuning = plans.prefill_config("sm90", FakeQuery(), 300, True, candidates, None, True)
    assert config == candidates[-1] and tuning["bucket"] == "d128-bfloat16-causal-q512-k512-bh8"
    plans.prefill_config("sm90", FakeQuery(), 300, True, candidates, None, False)
    assert asked == ["d128-bfloat16-causal-q512-k512-bh8", "d128-bfloat16-causal-q512-k512-bh8-masked"]
    capturing[0] = True
    assert plans.prefill_config("sm90", FakeQuery(), 300, True, candidates, None, True) == (candidates[0], None)
    assert len(asked) == 2


def test_cpu_float32_and_short_prefills_take_the_table_row_untimed(monkeypatch):
    import torch

    from flashpatch.kernels import AUTOTUNER, ForwardPlan, plans

    monkeypatch.setattr(AUTOTUNER, "pick", lambda *a: pytest.fail("nothing is timed on a CPU"))
    for dtype, seq_q in ((torch.float16, 40), (torch.float32, 40), (torch.float16, 16)):
        q, k, v = (torch.randn(1, 2, seq_q if i == 0 else 40, 64, dtype=dtype) for i in range(3))
        plan = plans.make_plan(q, k, v, causal=True, scale=0.125, key_padding_mask=None, dropout_p=0.1, seed=0,
                               seqused_k=None, segment_ids=None, need_lse=False, family=None, sm_count=8)
        assert isinstance(plan, ForwardPlan)


def test_candidates_serialise_with_their_kind():
    from flashpatch.kernels.autotune import config_from_row, config_row
    from flashpatch.kernels.forward_sm90 import SM90_CONFIGS

    for config in (CANDIDATES[0], SM90_CONFIGS[128][0]):
        assert config_from_row(json.loads(json.dumps(config_row(config)))) == config
    assert config_from_row({"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 2}) == TileConfig(64, 32, 4, 2)
    with pytest.raises(TypeError):
        config_from_row({"kernel": "Sm90Config", "no_such_field": 1})


def test_candidates_are_timed_as_calls_queued_back_to_back(monkeypatch):
    """time_ms times rounds of calls with no wait between them (a wait per call would count the host's launch time,
    which a busy stream hides), and returns the median round's time per call."""
    import torch

    from flashpatch.kernels import autotune

    log = []  # "run", "record", "sync" in the order they happen

    class FakeEvent:
        def __init__(self, enable_timing):
            self.at = None

        def record(self):
            log.append("record")
            self.at = log.count("run")

        def synchronize(self):
            log.append("sync")

        def elapsed_time(self, end):  # every call takes 0.5 ms on this fake GPU
            return 0.5 * (end.at - self.at)

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    assert autotune.time_ms(lambda: log.append("run"), fill_ms=3.0, rounds=3) == 0.5
    rounds = "".join("r" if e == "run" else "|" for e in log).split("|")
    assert [len(r) for r in rounds if r] == [1, 1, 6, 6, 6]  # warm-up, one call to size the rounds, 3 rounds of 6
