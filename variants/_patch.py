"""The bitsandbytes drop-in: ``patch_bitsandbytes()`` routes every place where bitsandbytes 0.50
multiplies or dequantizes a 4-bit weight on a GPU through nf4-explorer's dispatcher.

Two hooks, each the most robust for its entry point (the first one and the shortcut are left out
with ``linear=False``, see the class), and a shortcut:

- ``bitsandbytes::gemm_4bit`` (every ``Linear4bit.forward``, at every M; ``bnb.matmul_4bit``'s
  inference path; ``MatMul4Bit.forward`` in training): nf4-explorer's kernel is registered for the
  op's CUDA dispatch key with ``torch.library``. Every caller reaches the op through PyTorch's
  dispatcher, so the route holds whatever was imported first (bitsandbytes, peft, transformers),
  for references taken before the patch, and under ``torch.compile`` (the op and its fake stay
  bitsandbytes', only the kernel behind it changes). Removing the registration restores
  bitsandbytes' kernel exactly.
- ``bitsandbytes.functional.dequantize_4bit`` (``MatMul4Bit.backward``, legacy [K, N] weights, PEFT's
  merges): a module attribute, because with double quantization bitsandbytes decodes the absmax in
  Python (two launches) before its ``dequantize_4bit`` op, so the op is too late a hook. Callers that
  look it up at call time (bitsandbytes, peft) are routed; a copy taken with
  ``from bitsandbytes.functional import dequantize_4bit`` before the patch is not.
- The shortcut: ``Linear4bit.forward`` (a class attribute, so every instance and subclass, made
  before or after the patch) for a steady inference call (no gradient, not compiling, x already in
  the layer's compute dtype and the weight's dtype) calls nf4-explorer's linear directly. The op
  hook alone routes that call too, after bitsandbytes' Python (``fix_4bit_weight_quant_state_from_module``,
  ``matmul_4bit``'s checks, the op's dispatch): 50.9 µs of host time a q_proj forward against 36.0
  with the shortcut (H200 host, run S12.2), paid on every layer of every token of eager decoding.
  Every other call runs bitsandbytes' forward, routed by the op hook, so the shortcut changes no
  result: both end in the same kernel on the same weight.

CPU tensors are routed only under TRITON_INTERPRET=1 (as ``dequantize`` does, so that CI can test the
routing); XPU and other devices keep bitsandbytes' kernels.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch

from ._api import dequantize
from ._dispatch import linear_eager
from ._format import interpreter_enabled, prepare_weight_tensors

_ACTIVE = [None]  # the patch in force (one at a time)


class patch_bitsandbytes(contextlib.ContextDecorator):
    """Routes bitsandbytes' 4-bit matmul (``bitsandbytes::gemm_4bit``, ``Linear4bit.forward``) and its
    ``dequantize_4bit`` through nf4-explorer (see this module's docstring for the hooks and why).

    ``nf4_explorer.patch_bitsandbytes()`` patches at once and returns a handle: one line covers every
    ``Linear4bit`` of every model (transformers' ``load_in_4bit``, PEFT's QLoRA layers, plain
    ``bnb.nn.Linear4bit``). ``handle.restore()`` or leaving ``with nf4_explorer.patch_bitsandbytes():``
    puts bitsandbytes' kernels back. ``dequantize_4bit`` calls without a quant_state or with the
    legacy ``absmax=``/``blocksize=`` arguments go to bitsandbytes.

    ``linear=False`` routes ``dequantize_4bit`` only and leaves the matmul to bitsandbytes. The
    matmul is routed by default since the shortcut: measured end to end on an H200 (run S12.2, 32
    Llama-3-8B layers), eager decoding ran 33.4 tok/s routed against bitsandbytes' 29.5 at batch 1
    and 206.1 against 161.3 at batch 8 (the op hook alone: 28.7 and 194.5); static-cache decoding,
    prefill and QLoRA: ``docs/performance.md``, session 12.
    """

    def __init__(self, *, linear: bool = True):
        import bitsandbytes.functional as bnb_functional
        from bitsandbytes.nn import Linear4bit

        if _ACTIVE[0] is not None or getattr(bnb_functional.dequantize_4bit, "_nf4_explorer_patch", False):
            raise RuntimeError("bitsandbytes is already patched by nf4-explorer: restore the first patch first")
        self._module = bnb_functional
        self._original = bnb_functional.dequantize_4bit
        self._library = torch.library.Library("bitsandbytes", "IMPL")
        self._python_keys = []  # bitsandbytes' own Python registrations of these keys, given back on restore
        keys = (["CUDA"] + (["CPU"] if interpreter_enabled() else [])) if linear else []
        with warnings.catch_warnings():
            # PyTorch warns once that a registered kernel is overridden: that is the point here.
            warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
            for key in keys:
                self._override(key)
        bnb_functional.dequantize_4bit = _patched(self._original)
        self._layer_class, self._forward = Linear4bit, Linear4bit.__dict__.get("forward")
        if linear and self._forward is not None:
            Linear4bit.forward = _lean_forward(self._forward)
        _ACTIVE[0] = self
        self._active = True

    def _override(self, key: str) -> None:
        """Registers our gemm_4bit kernel for dispatch ``key`` on top of bitsandbytes' (which PyTorch's
        dispatcher keeps and restores when ours is removed). bitsandbytes registers its CUDA kernel from
        Python; torch.library refuses a second Python registration of one key unless told
        ``allow_override=True`` (torch 2.12+), and older versions only by its bookkeeping set."""
        name = f"bitsandbytes/gemm_4bit/{key}"
        registered = getattr(torch.library, "_impls", set())
        if name in registered:
            self._python_keys.append(name)  # removing ours drops the name: given back in restore()
        try:
            self._library.impl("gemm_4bit", _gemm_4bit, key, allow_override=True)
        except TypeError:  # torch before 2.12: no allow_override, only the bookkeeping set guards
            registered.discard(name)
            self._library.impl("gemm_4bit", _gemm_4bit, key)

    def restore(self) -> None:
        """Puts bitsandbytes' own kernels and dequantize_4bit back (idempotent)."""
        if self._active:
            self._library._destroy()
            # The Library's finalizer subtracts its records from torch.library's set once more when it
            # is collected: empty them, so that bitsandbytes' record given back here stays.
            getattr(self._library, "_op_impls", set()).clear()
            getattr(torch.library, "_impls", set()).update(self._python_keys)
            self._module.dequantize_4bit = self._original
            if getattr(self._layer_class.__dict__.get("forward"), "_nf4_explorer_patch", False):
                self._layer_class.forward = self._forward
            _ACTIVE[0] = None
            self._active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
        return False


def _gemm_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias=None, absmax_8bit=None, absmax_code=None,
               absmax_offset=None):
    """``bitsandbytes::gemm_4bit`` through ``nf4_explorer.linear``: A [..., K] times the packed
    [N, K] weight B, decoded in A's dtype as bitsandbytes does. With double quantization the op gets
    the nested absmax as ``absmax`` and the uint8 codes as ``absmax_8bit``."""
    if absmax_8bit is not None:  # bitsandbytes' double quantization: nested blocks of 256
        weight = prepare_weight_tensors(B, absmax_8bit, absmax_code, absmax, absmax_offset, shapeB, A.dtype, blocksize,
                                        256, quant_type, True)
    else:
        weight = prepare_weight_tensors(B, absmax, None, None, None, shapeB, A.dtype, blocksize, 256, quant_type, False)
    return linear_eager(A, B, None, bias, weight=weight)


def _lean_forward(original):
    """``Linear4bit.forward`` with the shortcut of this module's docstring: a call that bitsandbytes'
    forward would take to ``gemm_4bit`` without a cast or a gradient goes straight to linear_eager
    (decoding in x's dtype, as the op does); any other runs ``original``."""

    @functools.wraps(original)
    def forward(self, x):
        # The parameters straight from the module's dict: Module.__getattr__ costs ~0.8 µs a read.
        parameters = self.__dict__.get("_parameters", {})
        weight, bias = parameters.get("weight"), parameters.get("bias")
        state = getattr(weight, "quant_state", None)
        if (torch.compiler.is_compiling() or state is None or type(x) is not torch.Tensor or x.dim() == 0
                or x.dtype is not getattr(self, "compute_dtype", None) or x.dtype is not state.dtype
                or not getattr(self, "compute_type_is_set", False)
                or (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))
                or (bias is not None and bias.dtype is not x.dtype) or len(state.shape) != 2
                or state.shape[1] != x.shape[-1]
                or not (x.is_cuda or (interpreter_enabled() and not getattr(state, "packing_format_for_cpu", False)))):
            return original(self, x)
        return linear_eager(x, weight, state, bias)

    forward._nf4_explorer_patch = True
    return forward


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
