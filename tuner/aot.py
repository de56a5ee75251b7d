"""Ahead-of-time compilation of a variant's config for a GPU target, with no GPU present.

Used by the tests (every config of every variant must compile for every supported target) and to
read a kernel's PTX/AMDGCN (vector widths, fused multiply-adds) without a device.
"""

from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import nf4_explorer
from nf4_explorer.tuning import LAUNCH_PARAMS, launch_options, launch_parameters, problem_constexprs

# (backend, arch, warp size) of every target the project compiles for.
TARGETS = {
    "sm_75": GPUTarget("cuda", 75, 32),
    "sm_80": GPUTarget("cuda", 80, 32),
    "sm_86": GPUTarget("cuda", 86, 32),
    "sm_89": GPUTarget("cuda", 89, 32),
    "sm_90": GPUTarget("cuda", 90, 32),
    "gfx90a": GPUTarget("hip", "gfx90a", 64),
    "gfx942": GPUTarget("hip", "gfx942", 64),
}
_OUT_TYPES = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}


def signature(kernel, out_dtype: str, double_quant: bool) -> dict:
    """Triton signature of a family's kernel interface (see nf4_explorer/_registry.py and _linear.py);
    for the linear family ``out_dtype`` is x's dtype (x, bias and the output share it)."""
    types = {
        "packed_ptr": "*u8", "absmax_ptr": "*u8" if double_quant else "*fp32", "code2_ptr": "*fp32",
        "absmax2_ptr": "*fp32", "offset_ptr": "*fp32", "table_ptr": "*fp32", "out_ptr": _OUT_TYPES[out_dtype],
        "x_ptr": _OUT_TYPES[out_dtype], "bias_ptr": _OUT_TYPES[out_dtype],
    }
    sizes = {"n", "n_rows", "n_cols", "M", "N", "K"}  # the runtime integers; UPPER_SNAKE names are constexprs
    return {name: types.get(name, "i32" if name in sizes or not name.isupper() else "constexpr")
            for name in kernel.arg_names}


def compile_config(
    name: str, config: dict, target: GPUTarget, *, out_dtype: str = "bfloat16", double_quant: bool = True,
    blocksize: int = 64, quant_type: str = "nf4", aligned: bool = True, weight_dtype: str | None = None,
    bias: bool = True,
):
    """Compiles variant ``name`` at ``config`` for ``target``; returns Triton's CompiledKernel.
    ``weight_dtype``: a linear kernel's WEIGHT_DTYPE (the state's dtype), x's dtype where None;
    ``bias``: a linear kernel's HAS_BIAS.

    ``aligned`` marks every pointer and size divisible by 16, as Triton specializes them at run
    time for aligned tensors and sizes (this is what makes 16-byte accesses possible).
    """
    variant = nf4_explorer.get(name)
    kernel = variant.kernel
    sig = signature(kernel, out_dtype, double_quant)
    constexprs = {
        **problem_constexprs(blocksize, 256, quant_type, double_quant),
        **{k: v for k, v in config.items() if k not in LAUNCH_PARAMS},
    }
    if variant.family == "linear":
        import triton.language as tl

        constexprs.update(HAS_BIAS=bias, WEIGHT_DTYPE=getattr(tl, weight_dtype or out_dtype), K_IN_BLOCKS=True,
                          PTX=target.backend == "cuda")
        if config.get("SPLIT_K", 1) > 1:  # split-K writes float32 partial sums; the bias comes after them
            sig["out_ptr"] = "*fp32"
            constexprs["HAS_BIAS"] = False
    attrs = {}
    if aligned:
        attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(kernel.arg_names) if sig[arg] != "constexpr"}
    if getattr(kernel, "is_gluon", lambda: False)():
        from triton.experimental.gluon._runtime import GluonASTSource as source_type
    else:
        source_type = ASTSource
    source = source_type(kernel, sig, constexprs=constexprs, attrs=attrs)
    options = {**launch_parameters(config), **launch_options()}
    return triton.compile(source, target=target, options=options)


def supports(name: str, target: str) -> bool:
    """Whether variant ``name`` is built for ``target`` (a Gluon variant: NVIDIA targets of its
    compute capability or newer only)."""
    needs = nf4_explorer.get(name).min_capability
    backend, arch = TARGETS[target].backend, TARGETS[target].arch
    return needs is None or (backend == "cuda" and arch >= needs[0] * 10 + needs[1])


def compile_space(name: str, target: str) -> tuple[int, list[str]]:
    """Compiles every config of variant ``name`` (for blocksizes 64 and 32, whose spaces differ)
    for ``target``; returns (configs tried, failure descriptions)."""
    variant = nf4_explorer.get(name)
    configs = variant.configs(64) + [c for c in variant.configs(32) if c not in variant.configs(64)]
    failures = []
    for config in configs:
        try:
            compile_config(name, config, TARGETS[target], blocksize=32 if config not in variant.configs(64) else 64)
        except Exception as exc:  # report every failing config, not just the first
            failures.append(f"{config}: {type(exc).__name__}: {str(exc)[:300]}")
    return len(configs), failures


if __name__ == "__main__":
    # python -m nf4_explorer.tuner.aot VARIANT TARGET: compiles the variant's whole space; prints JSON.
    # (A separate process: under TRITON_INTERPRET=1 kernels cannot be compiled.)
    import json
    import sys

    tried, failed = compile_space(sys.argv[1], sys.argv[2])
    print(json.dumps({"tried": tried, "failures": failed}))
