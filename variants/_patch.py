"""The bitsandbytes drop-in: ``patch_bitsandbytes()`` routes bitsandbytes' 4-bit entry points
through nf4-explorer's dispatcher."""

from __future__ import annotations

import contextlib
import functools

from ._api import dequantize
from ._format import interpreter_enabled


class patch_bitsandbytes(contextlib.ContextDecorator):
    """Routes ``bitsandbytes.functional.dequantize_4bit`` (used by ``bnb.nn.Linear4bit``, PEFT's
    QLoRA layers and transformers' ``load_in_4bit`` models) through nf4-explorer's dispatcher.

    ``nf4_explorer.patch_bitsandbytes()`` patches at once and returns a handle; ``handle.restore()``
    or leaving ``with nf4_explorer.patch_bitsandbytes():`` puts bitsandbytes' function back. Calls
    without a quant_state, with bitsandbytes' legacy ``absmax=``/``blocksize=`` arguments, or on
    devices nf4-explorer cannot run on (a CPU tensor without TRITON_INTERPRET=1) go to bitsandbytes.
    """

    def __init__(self):
        import bitsandbytes.functional as bnb_functional

        self._module = bnb_functional
        self._original = bnb_functional.dequantize_4bit
        if getattr(self._original, "_nf4_explorer_patch", False):
            raise RuntimeError("bitsandbytes is already patched by nf4-explorer: restore the first patch first")
        bnb_functional.dequantize_4bit = _patched(self._original)
        self._active = True

    def restore(self) -> None:
        """Puts bitsandbytes' own dequantize_4bit back (idempotent)."""
        if self._active:
            self._module.dequantize_4bit = self._original
            self._active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
        return False


def _patched(original):
    @functools.wraps(original)
    def dequantize_4bit(A, quant_state=None, absmax=None, out=None, blocksize=None, quant_type="fp4"):
        runnable = A.is_cuda or interpreter_enabled()
        if quant_state is None or absmax is not None or blocksize is not None or not runnable:
            return original(A, quant_state, absmax, out, blocksize, quant_type)
        result = dequantize(A, quant_state, out=out)
        # bitsandbytes' shim: a packed weight passed transposed as [1, (N*K+1)//2] comes back transposed.
        return result.t() if A.shape[0] == 1 else result

    dequantize_4bit._nf4_explorer_patch = True
    return dequantize_4bit
