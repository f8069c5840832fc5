"""The launch cache's key: whatever Triton specializes a kernel on must change it."""

import pytest
import torch

from flashpatch.kernels.forward import _combine_splits_kernel
from flashpatch.kernels.launch import CachedLauncher

KEY = CachedLauncher(_combine_splits_kernel).key


def test_integer_classes_change_the_key():
    t = torch.zeros(8)
    def k(*ints):
        return KEY((t, *ints), {"BLOCK": 16})
    assert k(32, 7) == k(48, 23)  # same classes: a multiple of 16; another number
    assert k(32, 7) != k(33, 7) != k(1, 7)
    assert k(16, 7) != k(16, 2**31 + 7)
    assert k(16, 7) != KEY((t, 16, 7), {"BLOCK": 32})
    assert KEY((t, 16, 7), {"BLOCK": 16}, 0) != KEY((t, 16, 7), {"BLOCK": 16}, 1)  # compiled per device


def test_tensor_dtype_alignment_and_plain_values_change_the_key():
    flat = torch.zeros(64, dtype=torch.float16)
    assert KEY((flat[0:], 3), {}) == KEY((flat[8:], 3), {})  # 16 bytes apart
    assert KEY((flat[0:], 3), {}) != KEY((flat[1:], 3), {})
    assert KEY((flat, 3), {}) != KEY((flat.float(), 3), {})
    assert KEY((flat, True), {}) != KEY((flat, False), {}) != KEY((flat, None), {})
    assert KEY((flat, 1.5), {}) == KEY((flat, 2.5), {})
    with pytest.raises(TypeError, match="unexpected argument type"):
        KEY((flat, "x"), {})


def _fake_direct_launcher(monkeypatch, arg_names, stream):
    """A CachedLauncher on the direct path over a fake kernel: (launcher, C-launcher calls, compiles)."""
    import flashpatch.kernels.launch as launch

    runs, compiles = [], []

    class Compiled:
        function, packed_metadata = "fn", "meta"

        def run(self, *call):
            runs.append(call)

        def __getitem__(self, grid):  # Triton's runner, taken while a launch hook is set
            return lambda *args: runs.append(("runner", grid, *args))

    class Kernel:
        def __getitem__(self, grid):
            compiles.append(grid)
            return lambda *args, **kw: Compiled()

    Kernel.arg_names = arg_names
    monkeypatch.setattr(launch, "_current_device", lambda: 0)
    monkeypatch.setattr(launch, "_current_stream", lambda device: stream)
    monkeypatch.setattr(launch, "_launch_hooks_set", lambda: False)
    launcher = CachedLauncher(_combine_splits_kernel)
    launcher.kernel, launcher.direct = Kernel(), True
    return launcher, runs, compiles


def test_cached_launches_get_three_grid_dims(monkeypatch):
    """A compiled kernel's launch reads grid[0..2]: the cached path must pad a 2-D grid (the backward's), and
    hand the C launcher the current device's stream and the compiled kernel's handles."""
    launcher, runs, _ = _fake_direct_launcher(monkeypatch, ["x", "n", "BLOCK"], 1234)
    t = torch.zeros(4)
    launcher((3, 5), t, 7, BLOCK=16)  # first call: through the kernel, which compiles
    launcher((3, 5), t, 7, BLOCK=16)
    launcher((9,), t, 7, BLOCK=16)
    assert runs == [(3, 5, 1, 1234, "fn", "meta", None, None, None, t, 7, 16),
                    (9, 1, 1, 1234, "fn", "meta", None, None, None, t, 7, 16)]


def test_launch_hooks_are_seen_only_when_someone_set_one():
    """Triton 3.5+ keeps an empty HookChain where older releases kept None: neither is a hook, and the direct
    launch path must be taken; a registered hook (a profiler's) sends launches through Triton's own runner."""
    import triton

    import flashpatch.kernels.launch as launch

    assert not launch._launch_hooks_set()
    assert not launch._hook_active(None)
    hook = triton.knobs.runtime.launch_enter_hook
    if hasattr(hook, "add"):
        def listener(*args):
            return None

        hook.add(listener)
        try:
            assert launch._launch_hooks_set()
        finally:
            hook.remove(listener)
        assert not launch._launch_hooks_set()
    assert launch._hook_active(lambda *args: None)


def test_variants_finds_compiled_kernels_by_constexpr(monkeypatch):
    import flashpatch.kernels.launch as launch

    class Kernel:
        arg_names = ["x", "n", "BLOCK"]

        def __getitem__(self, grid):
            return lambda *args, **kw: f"compiled BLOCK={kw['BLOCK']}"

    monkeypatch.setattr(launch, "_current_device", lambda: 0)
    launcher = CachedLauncher(_combine_splits_kernel)
    launcher.kernel, launcher.direct = Kernel(), True
    for block in (16, 32):
        launcher((1,), torch.zeros(4), 7, BLOCK=block)
    assert launcher.variants(BLOCK=32) == ["compiled BLOCK=32"]
    assert len(launcher.variants()) == 2 and launcher.variants(BLOCK=64) == []
    assert len(launcher.variants(dtype=torch.float32)) == 2 and launcher.variants(dtype=torch.float16) == []


def test_planned_launches_find_kernels_by_alignment_and_varying_integer_classes(monkeypatch):
    """launch_planned compiles through the kernel once per full key, then finds the compiled kernel in the plan's
    own table by tensor alignment and the classes of the integers the plan lets vary."""
    launcher, runs, compiles = _fake_direct_launcher(monkeypatch, ["x", "n", "m", "BLOCK"], 99)
    flat = torch.zeros(16, dtype=torch.float16)
    variants = {}

    def planned(t, m):
        launcher.launch_planned(variants, (3,), (t,), (7, m), {"BLOCK": 16}, (m,))

    shifted = flat[8:]
    planned(flat, 32)  # compiles
    planned(flat, 48)  # same classes: the plan's table
    planned(shifted, 64)  # 16 bytes on: same alignment class
    assert len(compiles) == 1 and len(variants) == 1
    # The C launcher gets device addresses, not tensors (it would query the driver for each).
    assert runs == [(3, 1, 1, 99, "fn", "meta", None, None, None, flat.data_ptr(), 7, 48, 16),
                    (3, 1, 1, 99, "fn", "meta", None, None, None, shifted.data_ptr(), 7, 64, 16)]
    planned(flat, 33)  # another class of the varying integer: a kernel of its own
    planned(flat[1:], 32)  # another alignment
    assert len(compiles) == 3 and len(variants) == 3


def test_planned_launches_hand_tensors_to_launch_hooks(monkeypatch):
    """With a profiler's launch hook set, the launch goes through Triton's runner with the tensors themselves."""
    import flashpatch.kernels.launch as launch

    launcher, runs, _ = _fake_direct_launcher(monkeypatch, ["x", "n", "BLOCK"], 5)
    t = torch.zeros(4)
    variants = {}
    launcher.launch_planned(variants, (2,), (t,), (3,), {"BLOCK": 16}, ())  # compiles
    monkeypatch.setattr(launch, "_launch_hooks_set", lambda: True)
    launcher.launch_planned(variants, (2,), (t,), (3,), {"BLOCK": 16}, ())
    assert runs == [("runner", (2, 1, 1), t, 3, 16)]
