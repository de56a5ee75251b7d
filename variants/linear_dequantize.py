"""linear_dequantize: the tuned dequantize kernel into a reused workspace, then cuBLAS
(``torch.nn.functional.linear``). Bit-identical to ``F.linear(x, dequantize(packed, state).to(x.dtype),
bias)`` by construction; for large M, where the matmul's time dwarfs one pass over the weight."""

import dataclasses

import torch
import triton
import triton.language as tl

from ._decode import to_output
from ._dispatch import dequantize_prepared
from ._launch import KernelArguments, launch
from ._registry import Variant, register

# One dequantized-weight buffer per (device, dtype), as large as the largest weight seen: a model's
# layers run one after another on one stream, so one buffer serves them all.
_WORKSPACES: dict[tuple, torch.Tensor] = {}


def workspace(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [shape] view of the reused buffer for (device, dtype)."""
    n = shape.numel()
    key = (device, dtype)
    buffer = _WORKSPACES.get(key)
    # A buffer allocated during a CUDA-graph capture belongs to the graph's pool: not kept.
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if buffer is None or buffer.numel() < n or capturing:
        buffer = torch.empty(n, dtype=dtype, device=device)
        if not capturing:
            _WORKSPACES[key] = buffer
    return buffer[:n].view(shape)


@triton.jit
def cast_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    """dst = src in dst's dtype, through float32 and rounded to nearest even as ``Tensor.to`` does."""
    at = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = at < n
    tl.store(dst_ptr + at, to_output(tl.load(src_ptr + at, mask=mask).to(tl.float32), dst_ptr), mask=mask)


_CAST_CONFIG = {"BLOCK": 4096, "num_warps": 8}


def _run(args, config):
    # The weight was validated with the problem: dequantize it into the workspace as it is.
    shape = torch.Size((args.n, args.k))
    weight = dataclasses.replace(args.weight, out=workspace(shape, args.weight.out_dtype, args.device))
    dense = dequantize_prepared(weight)
    if dense.dtype != args.dtype:
        # x's dtype differs from the state's (a float16 x on a bfloat16 weight, a float32 x): the cast
        # into a workspace of x's dtype, bit-identical to Tensor.to (tests/test_linear.py), which took
        # 158 µs for 14336x4096 bfloat16 -> float16 on an H200 against this kernel's 62 (session 18).
        cast = workspace(shape, args.dtype, args.device)
        n = shape.numel()
        launch(cast_kernel, lambda c: (triton.cdiv(n, c["BLOCK"]),), KernelArguments([dense, cast, n], {}),
               _CAST_CONFIG, args.device, "linear_dequantize:cast")
        dense = cast
    args.out = torch.nn.functional.linear(args.x, dense, args.bias)


register(Variant(
    name="linear_dequantize",
    family="linear",
    kernel=None,
    grid=None,
    run=_run,
    space={},
    default={},
    description="tuned dequantize into a reused workspace, then cuBLAS (F.linear)",
))
