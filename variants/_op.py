"""nf4-explorer's torch.library custom ops (torch.compile) and the linear family's autograd.

Under ``torch.compile`` the dispatcher's Python (validation, file lookup, the launch) is opaque to
Dynamo: the public functions call the custom ops ``nf4_explorer::dequantize_4bit`` and
``nf4_explorer::linear_4bit`` with the state's tensors and scalars, and each op's fake
implementation gives the output's shape and dtype, so a model compiles with ``fullgraph=True`` and
no graph break, and runs the same kernels as eagerly (and replays them from CUDA graphs).

The linear op is differentiable in x and bias: the backward is bitsandbytes' ``MatMul4Bit.backward``
op for op (``grad @ dequantize(W).to(grad.dtype)``, ``grad.sum(0)`` for the bias), with the tuned
dequantize kernel.
"""

from __future__ import annotations

import torch

from ._dispatch import dequantize_eager, linear_eager
from ._format import nested_tensors, prepare_weight_tensors


def _state_arguments(packed: torch.Tensor, state) -> tuple:
    code2, absmax2, offset, nested_blocksize = nested_tensors(state, packed.device)
    return (state.absmax, code2, absmax2, offset, list(state.shape), state.dtype, int(state.blocksize),
            nested_blocksize, state.quant_type, getattr(state, "state2", None) is not None)


@torch.library.custom_op("nf4_explorer::dequantize_4bit", mutates_args=())
def dequantize_op(
    packed: torch.Tensor, absmax: torch.Tensor, code2: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor,
    shape: list[int], dtype: torch.dtype, blocksize: int, nested_blocksize: int, quant_type: str,
    double_quant: bool,
) -> torch.Tensor:
    weight = prepare_weight_tensors(packed, absmax, code2, absmax2, offset, shape, dtype, blocksize, nested_blocksize,
                                    quant_type, double_quant)
    return dequantize_eager(packed, None, weight=weight)


@dequantize_op.register_fake
def _(packed, absmax, code2, absmax2, offset, shape, dtype, blocksize, nested_blocksize, quant_type, double_quant):
    return packed.new_empty(shape, dtype=dtype)


def call_op(packed: torch.Tensor, state) -> torch.Tensor:
    """``dequantize(packed, state)`` through the custom op (what runs under torch.compile)."""
    return dequantize_op(packed, *_state_arguments(packed, state))


@torch.library.custom_op("nf4_explorer::linear_4bit", mutates_args=())
def linear_op(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, absmax: torch.Tensor, code2: torch.Tensor,
    absmax2: torch.Tensor, offset: torch.Tensor, shape: list[int], dtype: torch.dtype, blocksize: int,
    nested_blocksize: int, quant_type: str, double_quant: bool,
) -> torch.Tensor:
    weight = prepare_weight_tensors(packed, absmax, code2, absmax2, offset, shape, dtype, blocksize, nested_blocksize,
                                    quant_type, double_quant)
    return linear_eager(x, packed, None, bias, weight=weight)


@linear_op.register_fake
def _(x, packed, bias, absmax, code2, absmax2, offset, shape, dtype, blocksize, nested_blocksize, quant_type,
      double_quant):
    return x.new_empty((*x.shape[:-1], shape[0]))


def _linear_setup_context(ctx, inputs, output):
    x, packed, bias, *state_arguments = inputs
    ctx.save_for_backward(packed, *state_arguments[:4])
    ctx.state_scalars = state_arguments[4:]
    ctx.bias_dtype = None if bias is None else bias.dtype


def _linear_backward(ctx, grad_output):
    packed, absmax, code2, absmax2, offset = ctx.saved_tensors
    needs_x, _, needs_bias = ctx.needs_input_grad[:3]
    grad_x = grad_bias = None
    if needs_bias:
        # bitsandbytes' MatMul4Bit.backward, before grad_output changes dtype.
        grad_bias = grad_output.sum(0, dtype=ctx.bias_dtype)
    if needs_x:
        weight = dequantize_op(packed, absmax, code2, absmax2, offset, *ctx.state_scalars)
        grad_x = torch.matmul(grad_output, weight.to(grad_output.dtype))
    return (grad_x, None, grad_bias) + (None,) * 10


linear_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def call_linear_op(x: torch.Tensor, packed: torch.Tensor, state, bias: torch.Tensor | None) -> torch.Tensor:
    """``linear(x, packed, state, bias)`` through the custom op (torch.compile, autograd)."""
    return linear_op(x, packed, bias, *_state_arguments(packed, state))
