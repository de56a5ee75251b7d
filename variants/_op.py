"""``nf4_explorer.dequantize`` as a torch.library custom op (torch.compile) and the bitsandbytes drop-in.

Under ``torch.compile`` the dispatcher's Python (validation, file lookup, the launch) is opaque to
Dynamo: ``dequantize`` calls the custom op ``nf4_explorer::dequantize_4bit`` with the state's
tensors and scalars, and the op's fake implementation gives the output's shape and dtype, so a
model compiles with ``fullgraph=True`` and no graph break, and runs the same kernels as eagerly.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from ._format import QuantState, nested_tensors


@torch.library.custom_op("nf4_explorer::dequantize_4bit", mutates_args=())
def dequantize_op(
    packed: torch.Tensor, absmax: torch.Tensor, code2: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor,
    shape: list[int], dtype: torch.dtype, blocksize: int, nested_blocksize: int, quant_type: str,
    double_quant: bool,
) -> torch.Tensor:
    from ._dispatch import dequantize

    state2 = None
    if double_quant:
        state2 = QuantState(absmax=absmax2, shape=absmax2.shape, dtype=torch.float32, blocksize=nested_blocksize,
                            code=code2)
    state = QuantState(absmax=absmax, shape=torch.Size(shape), dtype=dtype, blocksize=blocksize,
                       quant_type=quant_type, offset=offset if double_quant else None, state2=state2)
    return dequantize(packed, state)


@dequantize_op.register_fake
def _(packed, absmax, code2, absmax2, offset, shape, dtype, blocksize, nested_blocksize, quant_type, double_quant):
    return packed.new_empty(shape, dtype=dtype)


def call_op(packed: torch.Tensor, state) -> torch.Tensor:
    """``dequantize(packed, state)`` through the custom op (what runs under torch.compile)."""
    code2, absmax2, offset, nested_blocksize = nested_tensors(state, packed.device)
    return dequantize_op(
        packed, state.absmax, code2, absmax2, offset, list(state.shape), state.dtype, int(state.blocksize),
        nested_blocksize, state.quant_type, getattr(state, "state2", None) is not None,
    )


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
    from ._dispatch import dequantize
    from ._format import interpreter_enabled

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
