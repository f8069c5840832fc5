"""Launching a Triton kernel without Triton's per-call Python work.

`kernel[grid](...)` binds every argument and recomputes its specialization on each call: about 80 us
of host time for our kernels' ~45 arguments on an H100 host, more than a decode step's attention
takes on the GPU. `CachedLauncher` goes through Triton once per specialization and afterwards calls
the compiled kernel's C launcher itself. Its cache key is at least as fine as Triton's own: each
tensor's dtype and 16-byte alignment, the current device, each integer's value class (== 1, multiple of 16,
32-bit range), booleans and None by value, and every constexpr and launch option.
"""

from __future__ import annotations

import torch

try:
    from triton import knobs as _knobs
except ImportError:  # no Triton: nothing is launched directly
    _knobs = None


class CachedLauncher:
    """`launcher(grid, *args, **constexprs_and_options)`: runtime arguments positionally, in the kernel's
    order and ahead of its constexprs, which come as keywords together with num_warps / num_stages.
    Tensors must be on the current CUDA device (as for Triton's own launch).

    The per-call key is built per argument type with positions worked out once per type pattern, so it costs a
    few microseconds: tensors by dtype and address mod 16, integers by (multiple of 16, == 1, 32-bit range).
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled: dict = {}
        self.layouts: dict = {}  # argument type pattern -> (tensor positions, int positions, value positions)
        self.direct = not _is_interpreted(kernel)

    def _layout(self, types):
        layout = self.layouts.get(types)
        if layout is None:
            for t in types:
                if t not in (torch.Tensor, torch.nn.Parameter, int, float, bool, type(None)):
                    raise TypeError(f"CachedLauncher: unexpected argument type {t.__name__}")
            tensors = tuple(i for i, t in enumerate(types) if issubclass(t, torch.Tensor))
            ints = tuple(i for i, t in enumerate(types) if t is int)
            values = tuple(i for i, t in enumerate(types) if t in (bool, type(None)))
            layout = self.layouts[types] = (tensors, ints, values)
        return layout

    def key(self, args, constexprs, device: int = -1) -> tuple:
        types = tuple(map(type, args))
        tensors, ints, values = self._layout(types)
        return (device, types, tuple(constexprs.items()),
                tuple((args[i].dtype, args[i].data_ptr() & 15) for i in tensors),
                tuple((args[i] % 16 == 0, args[i] == 1, args[i] >> 31) for i in ints),
                tuple(args[i] for i in values))

    def variants(self, dtype=None, **constexprs):
        """The compiled kernels whose constexprs and launch options include these, and whose first tensor
        argument has `dtype` when given (for inspection)."""
        return [compiled for key, (compiled, _) in self.compiled.items()
                if constexprs.items() <= dict(key[2]).items() and dtype in (None, key[3][0][0])]

    def __call__(self, grid, *args, **constexprs):
        if not self.direct:
            return self.kernel[grid](*args, **constexprs)
        device = _current_device()
        key = self.key(args, constexprs, device)
        entry = self.compiled.get(key)
        if entry is None:
            self._compile_and_launch(key, grid, args, constexprs)
            return
        self._run(entry, grid, device, args)

    def launch_planned(self, variants: dict, grid, tensors: tuple, scalars: tuple, constexprs: dict,
                       varying_ints: tuple, tag=None):
        """`self(grid, *tensors, *scalars, **constexprs)` for a caller (a plan) that fixes the argument types, the
        constexprs and every integer's class except those of `varying_ints` (integers among `scalars`). Compiled
        kernels are then found in the caller's `variants` by device, `tag`, the tensors' alignment and those
        integers' classes: a fraction of `key`'s cost."""
        if not self.direct:
            return self.kernel[grid](*tensors, *scalars, **constexprs)
        device = _current_device()
        addresses = [t.data_ptr() for t in tensors]
        key = (device, tag, *[a & 15 for a in addresses], *[(i % 16 == 0, i == 1, i >> 31) for i in varying_ints])
        entry = variants.get(key)
        if entry is None:
            args = (*tensors, *scalars)
            full_key = self.key(args, constexprs, device)
            entry = self.compiled.get(full_key)
            if entry is None:
                variants[key] = self._compile_and_launch(full_key, grid, args, constexprs)
                return
            variants[key] = entry
        # Addresses as integers: Triton's C launcher then skips a data_ptr() call and a driver query
        # (cuPointerGetAttribute) per pointer. The plan validated the tensors' devices when it was made.
        # A profiler's hooks get the tensors.
        self._run(entry, grid, device, (*tensors, *scalars), (*addresses, *scalars))

    def _compile_and_launch(self, key, grid, args, constexprs):
        compiled = self.kernel[grid](*args, **constexprs)
        names = self.kernel.arg_names[len(args):]  # the signature's constexprs, in order
        entry = self.compiled[key] = (compiled, tuple(constexprs[name] for name in names))
        return entry

    @staticmethod
    def _run(entry, grid, device: int, args, direct_args=None):
        """direct_args: what the C launcher gets instead of `args` when no launch hook is set."""
        compiled, constexpr_values = entry
        grid = (*grid, 1, 1)[:3]  # a compiled kernel wants all three grid dims
        if _launch_hooks_set():  # a profiler is listening: Triton's own runner calls its hooks
            compiled[grid](*args, *constexpr_values)
            return
        # What `compiled[grid](...)` does, minus its per-call closure, device query and stream object.
        compiled.run(*grid, _current_stream(device), compiled.function, compiled.packed_metadata,
                     None, None, None, *(args if direct_args is None else direct_args), *constexpr_values)


# torch's own C entry points (what Triton's driver calls), without torch.cuda's Python wrappers around them.
def _current_device() -> int:
    return torch._C._cuda_getDevice()


def _current_stream(device: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device)


def _launch_hooks_set() -> bool:
    runtime = _knobs.runtime
    return _hook_active(runtime.launch_enter_hook) or _hook_active(runtime.launch_exit_hook)


def _hook_active(hook) -> bool:
    """Older Triton leaves an unset hook None; newer Triton always holds a HookChain, active when it has calls."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return calls is None or bool(calls)


def _is_interpreted(kernel) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


# Host-side arithmetic in plain Python: triton.cdiv / triton.next_power_of_2 are jit functions whose host
# call costs microseconds each.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1
