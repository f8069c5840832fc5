"""Triton's CPU interpreter before 3.7 with NumPy 2.4 or newer: `range()` over a kernel's integer argument fails.

Those interpreters hold scalar arguments as one-element arrays and index them with `int(array)`, which NumPy 2.4
refuses for arrays of one dimension ("only 0-dimensional arrays can be converted to Python scalars"). Newer
interpreters squeeze first; this gives older ones the same rule. Nothing changes for compiled kernels.
"""

from __future__ import annotations


def install() -> None:
    try:
        from triton.runtime import interpreter
    except ImportError:  # no Triton, or one without an interpreter
        return
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "squeezes_index", False):
        return

    def patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor.squeezes_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor
