"""The public entry points: eager calls go straight to the dispatcher; under torch.compile, or when
a gradient is needed, through the custom ops of ``_op.py``."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ._dispatch import dequantize_eager, linear_eager
from ._op import call_linear_op, call_op


def dequantize(
    packed: torch.Tensor,
    state: Any,
    *,
    out: torch.Tensor | None = None,
    variant: str | None = None,
    config: Mapping | None = None,
) -> torch.Tensor:
    """Dequantizes a bitsandbytes 4-bit weight; bit-identical to ``bitsandbytes.functional.dequantize_4bit``.

    Args:
        packed: uint8 packed codes, shape [ceil(n/2), 1] (bitsandbytes) or any shape with that many
            bytes (e.g. [rows, cols/2]); element 2i in the high nibble of byte i. Non-contiguous
            input is copied.
        state: a :class:`nf4_explorer.QuantState` or a bitsandbytes ``QuantState`` (duck-typed).
        out: optional contiguous output of ``state.shape`` and ``state.dtype`` on packed's device. An
            ``out`` that overlaps any input's memory (packed, absmax, the nested state) is refused
            with a ValueError: the kernels would read what they had already overwritten.
        variant, config: force a registered dequantize variant (and one config of its space); None
            lets the dispatcher choose from the GPU's tuned file or the built-in default.

    Returns:
        Tensor of ``state.shape`` and ``state.dtype`` (float16, bfloat16 or float32).

    Raises:
        TypeError / ValueError naming the problem and the fix (wrong dtype, sizes, devices, unknown
        variant or config, CPU tensors without TRITON_INTERPRET=1).
    """
    if torch.compiler.is_compiling():
        # Under torch.compile the whole call is one opaque custom op (see _op.py).
        if out is not None or variant is not None or config is not None:
            raise ValueError("under torch.compile, dequantize takes no out=/variant=/config=: set "
                             "$NF4_EXPLORER_VARIANT or tune instead")
        return call_op(packed, state)
    return dequantize_eager(packed, state, out=out, variant=variant, config=config)


def linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    state: Any,
    bias: torch.Tensor | None = None,
    *,
    variant: str | None = None,
    config: Mapping | None = None,
) -> torch.Tensor:
    """``torch.nn.functional.linear(x, dequantize(packed, state).to(x.dtype), bias)`` for a bitsandbytes
    4-bit weight, without writing the dequantized weight (fused variants: one launch).

    Args:
        x: [..., K] float16, bfloat16 or float32 (any leading shape; non-contiguous input is copied).
        packed, state: the weight, as for :func:`dequantize`, in bitsandbytes' ``Linear4bit``
            orientation: ``state.shape == [N, K]`` (out_features, in_features).
        bias: optional [N] tensor of x's dtype.
        variant, config: force a registered linear variant (``names(family="linear")``) and config.

    Returns:
        [..., N] in x's dtype. The fused variants sum in another order than cuBLAS: their error
        against x and the dequantized weight multiplied in float64 is at most twice cuBLAS's plus
        one ulp of x's dtype (``_linear.tolerance``); ``linear_dequantize`` is bit-identical to
        ``F.linear``. Differentiable in x and bias (the backward matches bitsandbytes' bit for bit).

    Raises:
        TypeError / ValueError naming the problem and the fix.
    """
    needs_grad = torch.is_grad_enabled() and (getattr(x, "requires_grad", False)
                                              or getattr(bias, "requires_grad", False))
    if torch.compiler.is_compiling() or needs_grad:
        if variant is not None or config is not None:
            raise ValueError("with autograd or under torch.compile, linear takes no variant=/config=: set "
                             "$NF4_EXPLORER_LINEAR_VARIANT or tune instead")
        return call_linear_op(x, packed, state, bias)
    return linear_eager(x, packed, state, bias, variant=variant, config=config)
