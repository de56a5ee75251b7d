"""linear_bitsandbytes: bitsandbytes' own fused 4-bit GEMV/GEMM kernel (``cgemm_4bit_*``, its CUDA
kernel for small M), as one more candidate of the linear family. The explorer's job is the fastest
kernel per card and problem: on the H200 this kernel beats every other linear variant at M <= 64
(docs/performance.md, session 5), so the tuner may pick it there, and routing bitsandbytes' layers
through nf4-explorer (``patch_bitsandbytes``) never makes them slower than bitsandbytes' own choice.
It needs bitsandbytes (0.50's CUDA backend) and a CUDA GPU; elsewhere it declines the problem."""

import functools

from ._registry import Variant, register


@functools.cache  # looked up once: an import statement on every call costs microseconds of host time
def _kernel():
    """bitsandbytes' fused-kernel launcher, or None (not installed, no CUDA backend, another API)."""
    try:
        from bitsandbytes.backends.cuda import ops
    except Exception:  # not installed, or its library does not load here
        return None
    return getattr(ops, "_gemm_4bit_kernel_impl", None)


def _accepts(args):
    if args.device.type != "cuda":
        return "linear_bitsandbytes runs bitsandbytes' CUDA kernel: it needs CUDA tensors (use another linear variant)"
    if args.k % args.blocksize:
        return f"linear_bitsandbytes needs K % blocksize == 0 (K = {args.k}, blocksize {args.blocksize})"
    if args.weight.double_quant and args.weight.nested_blocksize != 256:
        return "linear_bitsandbytes needs the nested blocksize 256 of bitsandbytes' double quantization"
    if args.weight.out_dtype != args.dtype:
        return "linear_bitsandbytes decodes the weight in x's dtype: the state's dtype must be x's"
    if args.x.data_ptr() % 16:  # its kernel faults on x at 2-8 bytes past a boundary (H200, session 20)
        return ("linear_bitsandbytes runs bitsandbytes' kernel, which needs x's data on a 16-byte boundary: pass "
                "a contiguous x of its own (x.clone()) or another variant")
    if _kernel() is None:
        return "linear_bitsandbytes needs bitsandbytes 0.50 with its CUDA backend (pip install bitsandbytes)"
    return None


def _run(args, config):
    w = args.weight
    packed = w.packed.view(-1, 1)
    shape = [args.n, args.k]
    if w.double_quant:
        args.out = _kernel()(args.x, packed, shape, w.absmax2, w.blocksize, w.quant_type, args.bias,
                             w.absmax, w.code2, w.offset)
    else:
        args.out = _kernel()(args.x, packed, shape, w.absmax, w.blocksize, w.quant_type, args.bias, None, None, None)


register(Variant(
    name="linear_bitsandbytes",
    family="linear",
    kernel=None,
    grid=None,
    run=_run,
    space={},
    default={},
    description="bitsandbytes' own fused 4-bit kernel (cgemm_4bit), as a candidate",
    accepts=_accepts,
))
