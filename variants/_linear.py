"""The linear family's problem: ``x @ dequantize(W).T (+ bias)`` for a bitsandbytes 4-bit weight.

The weight is in bitsandbytes' ``Linear4bit`` orientation: ``state.shape == [N, K]`` (out_features,
in_features), packed row-major exactly as for dequantization. ``x`` is ``[..., K]`` in float16,
bfloat16 or float32; the output is ``[..., N]`` in x's dtype. The value is that of
``torch.nn.functional.linear(x, dequantize(packed, state).to(x.dtype), bias)``.

Kernel interface of the family (one launcher serves every kernel, see ``_launch.py``)::

    kernel[grid](x_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr, bias_ptr, out_ptr,
                 M, N, K,
                 BLOCKSIZE, NESTED_BLOCKSIZE, QUANT_TYPE, DOUBLE_QUANT, HAS_BIAS, WEIGHT_DTYPE, K_IN_BLOCKS, PTX,
                 <the variant's own constexprs>)

``x`` is seen as a contiguous [M, K] matrix and ``out`` as [M, N]; ``table_ptr`` holds the 16 values
then the 256 byte pairs (``_format.device_pair_table``); ``WEIGHT_DTYPE`` is the state's
dtype (a fused kernel that rounds its decoded weight rounds it there first, as dequantize does);
``K_IN_BLOCKS`` says K is a multiple of the blocksize, so a weight row holds whole quantization
blocks (every LLM shape): kernels then read absmax once per block instead of once per element;
``PTX`` says the kernel runs on an NVIDIA GPU (not the interpreter, not ROCm), where inline PTX
(the register LUT decode) is available.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import triton.language as tl

from ._format import (OUT_DTYPES, DequantArgs, device_pair_table, interpreter_enabled, prepare, prepare_weight,
                      problem_constexprs)

# M buckets of the tuned file: a problem with M rows of x uses the entry of the smallest bucket >= M.
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_CONSTEXPRS: dict[tuple, dict] = {}  # the problem constexprs of a format (shared: read, never changed)


def runs_ptx(device: torch.device) -> bool:
    """Whether kernels on ``device`` can use inline PTX: an NVIDIA GPU, not Triton's interpreter."""
    return device.type == "cuda" and torch.version.hip is None and not interpreter_enabled()


def lut_refusal(args: "LinearArgs", name: str, why: str, block_tables: bool = False) -> str | None:
    """Why a register-LUT variant (linear_gemv, linear_lut_tiled, ...) cannot take a problem, or None:
    it needs rows of whole quantization blocks and a 16-bit x, not a float16 x on a bfloat16 weight
    unless it decodes that pair from tables of each block's exact weights (``block_tables``:
    ``_decode.block_planes``) (``why`` it needs a 16-bit x)."""
    if args.k % args.blocksize:
        return (f"{name} needs K (in_features) to be a multiple of the blocksize; K = {args.k}, "
                f"blocksize {args.blocksize}: use linear_tiled or linear_dequantize")
    if args.dtype.itemsize != 2:
        return (f"{name} {why}, within tolerance for float16/bfloat16 x only; x is {args.dtype}: use "
                "linear_tiled or linear_dequantize")
    if args.dtype == torch.float16 and args.weight.out_dtype == torch.bfloat16 and not block_tables:
        # It decodes on x's float16 grid, finer than the bfloat16 weight the contract's reference
        # rounds to: ~2x over the bound at K = 4096 (tests/test_linear.py). linear_tiled rounds first.
        return (f"{name} decodes the weight on x's float16 grid, finer than the bfloat16 weight (state.dtype) "
                "the contract rounds to: use linear_gemv_gluon, linear_mma_gemv, linear_wgmma, linear_tiled or "
                "linear_dequantize, or pass x in bfloat16")
    return None


def m_bucket(m: int) -> int:
    """The M bucket of ``m`` rows: the smallest of M_BUCKETS that holds them (the last beyond it)."""
    for bucket in M_BUCKETS:
        if m <= bucket:
            return bucket
    return M_BUCKETS[-1]


@dataclasses.dataclass
class LinearArgs:
    """A validated linear problem, ready for any linear variant.

    x:      the caller's input, [..., K] (``x2d`` is its contiguous [M, K] view).
    weight: the validated 4-bit weight (DequantArgs without an output buffer).
    out:    [M, N] output in x's dtype; None until a variant allocates or returns it.
    """

    x: torch.Tensor
    x2d: torch.Tensor
    weight: DequantArgs
    bias: torch.Tensor | None
    out: torch.Tensor | None
    m: int
    n: int
    k: int
    dtype: torch.dtype
    device: torch.device

    @property
    def blocksize(self) -> int:
        return self.weight.blocksize

    def kernel_arguments(self):
        """The linear family's kernel interface (see this module's docstring)."""
        from ._launch import KernelArguments

        if self.out is None:
            self.out = torch.empty((self.m, self.n), dtype=self.dtype, device=self.device)
        w = self.weight
        key = (w.blocksize, w.nested_blocksize, w.quant_type, w.double_quant, self.bias is not None, w.out_dtype,
               self.k % w.blocksize == 0, self.device.type)
        constexprs = _CONSTEXPRS.get(key)  # built once per format: ~1 µs a call saved
        if constexprs is None:
            constexprs = _CONSTEXPRS[key] = problem_constexprs(w.blocksize, w.nested_blocksize, w.quant_type,
                                                               w.double_quant)
            constexprs.update(HAS_BIAS=self.bias is not None, WEIGHT_DTYPE=_TL_DTYPES[w.out_dtype],
                              K_IN_BLOCKS=self.k % w.blocksize == 0, PTX=runs_ptx(self.device))
        return KernelArguments(runtime_arguments(self.x2d, w, device_pair_table(w.quant_type, self.device), self.bias,
                                                 self.out, self.m, self.n, self.k), constexprs)

    def result(self) -> torch.Tensor:
        """The output in the caller's shape [..., N]."""
        out = self.out
        return out if out.dim() == self.x.dim() else out.view(*self.x.shape[:-1], self.n)


def runtime_arguments(x2d, weight: DequantArgs, table, bias, out, m: int, n: int, k: int) -> list:
    """The family's runtime kernel arguments in signature order (see this module's docstring): from
    ``kernel_arguments``, and from the dispatcher's lean path with data pointers in place of tensors."""
    return [x2d, weight.packed, weight.absmax, weight.code2, weight.absmax2, weight.offset, table,
            bias if bias is not None else x2d, out, m, n, k]


def prepare_linear(x: torch.Tensor, packed: torch.Tensor, state: Any, bias: torch.Tensor | None = None, *,
                   for_kernel: bool = True, weight: DequantArgs | None = None) -> LinearArgs:
    """Validates a linear problem and returns its :class:`LinearArgs`. Raises TypeError/ValueError
    naming the problem and the fix. ``weight``: the weight, validated already (``prepare_weight_tensors``)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if weight is None:
        weight = (prepare_weight(packed, state) if for_kernel else
                  prepare(packed, state, None, for_kernel=False, allocate=False))
    shape = weight.shape
    if len(shape) != 2:
        raise ValueError(
            f"linear needs a 2-D weight: state.shape is {tuple(shape)}; bitsandbytes' Linear4bit stores "
            "[out_features, in_features]"
        )
    n, k = shape
    if x.dtype not in OUT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}: cast it with x.to(torch.bfloat16)")
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(
            f"x has shape {tuple(x.shape)} but the weight is [{n}, {k}] (out_features, in_features): x's last "
            f"dimension must be {k}"
        )
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the weight is on {weight.device}: move both to one device")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (n,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, the layer has {n} outputs: pass a [{n}] bias")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias is {bias.dtype} but x is {x.dtype}: torch.nn.functional.linear needs one dtype "
                            f"(bias.to({x.dtype}))")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}: move both to one device")
        bias = bias if bias.is_contiguous() else bias.contiguous()
    m = x.numel() // k if k else 0
    x2d = x if x.dim() == 2 else x.reshape(m, k)  # a view costs ~1 µs a call: none for 2-D x
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    return LinearArgs(x=x, x2d=x2d, weight=weight, bias=bias, out=None, m=m, n=n, k=k, dtype=x.dtype,
                      device=weight.device)


def reference_linear(x: torch.Tensor, packed: torch.Tensor, state: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x and the exactly dequantized weight (in x's dtype) multiplied in float64: the ground truth
    the linear family's tolerance is measured against. Returns float64 [..., N]."""
    from ._reference import reference_dequantize

    weight = reference_dequantize(packed, state).to(x.dtype)
    out = x.double() @ weight.double().t()
    return out + bias.double() if bias is not None else out


def tolerance(x: torch.Tensor, packed: torch.Tensor, state: Any, bias: torch.Tensor | None = None,
              reference: torch.Tensor | None = None) -> float:
    """The linear family's contract: the largest error a fused variant may have against
    :func:`reference_linear`: twice cuBLAS's (``F.linear`` on the dequantized weight in x's dtype)
    plus one ulp of x's dtype at the largest reference value."""
    from ._reference import reference_dequantize

    if reference is None:
        reference = reference_linear(x, packed, state, bias)
    weight = reference_dequantize(packed, state).to(x.dtype)
    dense = torch.nn.functional.linear(x, weight, bias)
    dense_error = (dense.double() - reference).abs().max().item()
    top = reference.abs().max().item()
    # ulp at the largest value: eps (the ulp of 1.0) scaled to that value's binade.
    ulp = torch.finfo(x.dtype).eps * 2.0 ** (math.frexp(top)[1] - 1) if top > 0 else torch.finfo(x.dtype).tiny
    return 2 * dense_error + ulp
