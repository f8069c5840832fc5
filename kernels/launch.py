"""Launching a Triton kernel without Triton's per-call Python work.

`kernel[grid](...)` binds every argument and recomputes its specialization on each call: about 80 us
of host time for our kernels' ~45 arguments on an H100 host, more than a decode step's attention
takes on the GPU. `CachedLauncher` goes through Triton once per specialization and afterwards calls
the compiled kernel's launcher directly. Its cache key is at least as fine as Triton's own: each
tensor's dtype and 16-byte alignment, the device, each integer's value class (== 1, multiple of 16, 32-bit range),
booleans and None by value, and every constexpr and launch option.
"""

from __future__ import annotations

import torch


class CachedLauncher:
    """`launcher(grid, *args, **constexprs_and_options)`: runtime arguments positionally, in the kernel's
    order and ahead of its constexprs, which come as keywords together with num_warps / num_stages.

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

    def key(self, args, constexprs) -> tuple:
        types = tuple(map(type, args))
        tensors, ints, values = self._layout(types)
        return (types, tuple(constexprs.items()),
                tuple((args[i].dtype, args[i].data_ptr() & 15, args[i].device) for i in tensors),
                tuple((args[i] % 16 == 0, args[i] == 1, args[i] >> 31) for i in ints),
                tuple(args[i] for i in values))

    def __call__(self, grid, *args, **constexprs):
        if not self.direct:
            return self.kernel[grid](*args, **constexprs)
        key = self.key(args, constexprs)
        entry = self.compiled.get(key)
        if entry is None:
            compiled = self.kernel[grid](*args, **constexprs)
            names = self.kernel.arg_names[len(args):]  # the signature's constexprs, in order
            self.compiled[key] = (compiled, tuple(constexprs[name] for name in names))
            return
        compiled, constexpr_values = entry
        compiled[(*grid, 1, 1)[:3]](*args, *constexpr_values)  # a compiled kernel wants all three grid dims


def _is_interpreted(kernel) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


# Host-side arithmetic in plain Python: triton.cdiv / triton.next_power_of_2 are jit functions whose host
# call costs microseconds each.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1
