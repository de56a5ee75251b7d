"""linear_dequantize: the tuned dequantize kernel into a reused workspace, then cuBLAS
(``torch.nn.functional.linear``). Bit-identical to ``F.linear(x, dequantize(packed, state).to(x.dtype),
bias)`` by construction; for large M, where the matmul's time dwarfs one pass over the weight."""

import dataclasses

import torch

from ._dispatch import dequantize_prepared
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


def _run(args, config):
    # The weight was validated with the problem: dequantize it into the workspace as it is.
    weight = dataclasses.replace(args.weight, out=workspace(torch.Size((args.n, args.k)), args.weight.out_dtype,
                                                            args.device))
    args.out = torch.nn.functional.linear(args.x, dequantize_prepared(weight).to(args.dtype), args.bias)


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
