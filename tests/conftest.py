import os
import random

import pytest
import torch

# Without CUDA the kernels run in Triton's interpreter; it must be on before they are defined.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
# On a GPU the tests check the math of the first candidates (on Hopper the Gluon kernel's default config, elsewhere
# the tile table's rows); every tuning candidate has its own test (test_gpu_attention.py, test_forward_sm90.py).
# Timing candidates for each new shape, in parallel workers, would only cost time.
os.environ.setdefault("FLASHPATCH_AUTOTUNE", "0")

HAS_CUDA = torch.cuda.is_available()
WIKITEXT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2-raw", "wiki.test.raw")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def seed():
    """Fresh inputs per test; the seed is printed, so a failure's captured output says how to replay it."""
    value = random.randrange(2 ** 31)
    torch.manual_seed(value)
    print(f"seed {value}")
    return value


@pytest.fixture
def poison_empty(monkeypatch):
    """torch.empty returns NaN-filled tensors, so any element a kernel fails to write shows."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", poisoned)
