"""Choosing among a few tile candidates by timing them once, remembered on disk across processes.

Keyed by GPU family, head-dim bucket, dtype, causal and power-of-two buckets of the lengths and of batch x heads;
the first call with a new key times every candidate on the caller's own tensors, later calls (and later
processes) read the answer. FLASHPATCH_AUTOTUNE=0 turns it off (the first candidate is used). The decode path
never tunes: its launches must stay cheap and graph-capturable.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from dataclasses import asdict

from .config import TileConfig

ENV_SWITCH = "FLASHPATCH_AUTOTUNE"
ENV_CACHE_DIR = "FLASHPATCH_CACHE_DIR"
# In the cache file's name: choices made by an older way of timing (version 1: single calls) are made again.
CACHE_VERSION = 2


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") not in ("0", "false", "off")


def _bucket(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def tune_key(head_dim_bucket: int, dtype: str, causal: bool, seq_q: int, seq_k: int, rows: int | None = None) -> str:
    """rows: batch x query heads, bucketed too: how many tiles a length gives the SMs decides which candidate
    fills them best (a batch-1 prefill's 512 tiles of 2K tokens against a batch-8 training call's 4096)."""
    key = f"d{head_dim_bucket}-{dtype}-{'causal' if causal else 'full'}-q{_bucket(seq_q)}-k{_bucket(seq_k)}"
    return key if rows is None else f"{key}-bh{_bucket(rows)}"


def cache_file(family: str) -> str:
    import triton

    folder = os.environ.get(ENV_CACHE_DIR) or os.path.join(os.path.expanduser("~"), ".cache", "flashpatch")
    return os.path.join(folder, f"autotune-v{CACHE_VERSION}-{family}-triton{triton.__version__}.json")


def config_row(config) -> dict:
    """A candidate as a JSON row: its fields and which kernel's config it is."""
    return {"kernel": type(config).__name__, **asdict(config)}


def config_from_row(row: dict):
    """The candidate a `config_row` describes (TypeError for a row this version can't read)."""
    row = dict(row)
    kind = row.pop("kernel", "TileConfig")
    if kind == "Sm90Config":
        from .forward_sm90 import Sm90Config

        return Sm90Config(**row)
    if kind != "TileConfig":
        raise TypeError(f"unknown tile candidate kind {kind!r}")
    return TileConfig(**row)


class Autotuner:
    def __init__(self):
        self.choices: dict[str, dict[str, TileConfig]] = {}  # family -> key -> config
        self.timings: dict[tuple[str, str], dict[str, float]] = {}  # (family, key) -> {label: ms}, timed here

    def describe(self, family: str, key: str) -> dict:
        """How `key`'s choice was made, for kernels_used(): its candidates' timings (ms, inf: failed to run) where
        this process timed them, else None (read from the cache file)."""
        return {"bucket": key, "timed_ms": self.timings.get((family, key))}

    def _load(self, family: str) -> dict[str, TileConfig]:
        if family not in self.choices:
            try:
                with open(cache_file(family)) as f:
                    self.choices[family] = {key: config_from_row(row) for key, row in json.load(f).items()}
            except (OSError, ValueError, TypeError):  # no file yet, or one we can't read: tune again
                self.choices[family] = {}
        return self.choices[family]

    def _save(self, family: str) -> None:
        path = cache_file(family)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            rows = {key: config_row(cfg) for key, cfg in self._load(family).items()}
            with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), delete=False, suffix=".tmp") as f:
                json.dump(rows, f, indent=1, sort_keys=True)
            os.replace(f.name, path)  # atomic: concurrent processes never read half a file
        except OSError as exc:
            warnings.warn(f"flashpatch: could not write the autotune cache {path}: {exc}", stacklevel=3)

    def pick(self, family: str, key: str, candidates: list[TileConfig], time_ms) -> TileConfig:
        """The fastest candidate for `key` (timing each with `time_ms(cfg)` the first time), or the first
        candidate when tuning is off. A remembered choice that is not among this call's candidates (another
        checkout's cache, a kernel switched off since) is timed afresh."""
        if not enabled() or len(candidates) == 1:
            return candidates[0]
        known = self._load(family)
        if key in known and known[key] in candidates:
            return known[key]
        timings = []
        for cfg in candidates:
            try:
                timings.append((time_ms(cfg), cfg))
            except Exception as exc:  # a candidate this GPU can't run (resources): never chosen
                timings.append((math.inf, cfg))
                warnings.warn(f"flashpatch: tile candidate {cfg} failed to run ({type(exc).__name__})", stacklevel=3)
        self.timings[(family, key)] = {cfg.label(): round(ms, 4) for ms, cfg in timings}
        best_ms, best = min(timings, key=lambda t: t[0])
        if math.isinf(best_ms):
            return candidates[0]
        known[key] = best
        self._save(family)
        return best


AUTOTUNER = Autotuner()


MAX_TIMED_CALLS = 64  # per timing round: short calls (tens of microseconds) need no more to fill fill_ms


def time_ms(run, fill_ms: float = 3.0, rounds: int = 3) -> float:
    """Milliseconds per call of `run()`, timed as calls run in use: queued back to back on the stream, so that the
    host's launch time hides behind the GPU's. After a warm-up (which also compiles), the median of `rounds`
    CUDA-event timings of as many calls as fill about `fill_ms`. Single calls with a sync between them counted the
    host's time too, and on an H200 led the tuner to a candidate up to 1.20x slower than the fastest
    (scripts/autotune_choices.py, BENCHMARKS §1b)."""
    import torch

    run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    calls = max(1, min(MAX_TIMED_CALLS, math.ceil(fill_ms / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(rounds):
        start.record()
        for _ in range(calls):
            run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]

