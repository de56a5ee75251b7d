"""Every variant, at every config of its search space, compiles ahead of time (no GPU needed) for
CUDA sm_75/80/86/89/90 and HIP gfx90a/gfx942.

Compilation runs in a subprocess without TRITON_INTERPRET (the interpreter cannot compile).
"""

import json
import os
import subprocess
import sys

import pytest

import nf4_explorer
from nf4_explorer.tuner.aot import TARGETS, supports


def _run(code_or_module_args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, *code_or_module_args], capture_output=True, text=True, env=env,
                            timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("name", nf4_explorer.names())
def test_every_config_compiles(name, target):
    if not supports(name, target):
        pytest.skip(f"{name} is not built for {target}")
    report = json.loads(_run(["-m", "nf4_explorer.tuner.aot", name, target]).strip().splitlines()[-1])
    assert report["tried"] > 0
    assert not report["failures"], (
        f"{len(report['failures'])} of {report['tried']} configs of {name} fail for {target}:\n"
        + "\n".join(report["failures"])
    )


@pytest.mark.slow
@pytest.mark.parametrize("target", ["sm_80", "sm_90", "gfx942"])
def test_linear_variants_compile(target):
    """Each fused linear kernel compiles ahead of time at its default config and its space's corners
    (smallest and largest tiles) for bfloat16, float16 and float32 x and a float16 x on a bfloat16 weight
    (those its ``accepts`` takes: the register-LUT variants decline float32, most of them the pair);
    their whole spaces are hundreds of configs each, which the tuner prunes on the card. Split-K's
    second kernel compiles too."""
    code = f"""
import json, types, torch, nf4_explorer
from nf4_explorer.tuner.aot import TARGETS, compile_config, supports
failures, tried = [], 0
for name in nf4_explorer.names(family="linear"):
    variant = nf4_explorer.get(name)
    if variant.kernel is None or not supports(name, "{target}"):
        continue
    configs = variant.configs(64)
    for config in (variant.default_config(64), configs[0], configs[-1]):
        for dtype, weight_dtype in (("bfloat16",) * 2, ("float16",) * 2, ("float32",) * 2, ("float16", "bfloat16")):
            if variant.accepts(types.SimpleNamespace(k=4096, blocksize=64, dtype=getattr(torch, dtype),
                                                    x2d=torch.empty(0, dtype=getattr(torch, dtype)),
                                                    weight=types.SimpleNamespace(out_dtype=getattr(torch, weight_dtype)))):
                continue
            tried += 1
            try:
                compile_config(name, config, TARGETS["{target}"], out_dtype=dtype, weight_dtype=weight_dtype)
            except Exception as exc:
                failures.append(f"{{name}} {{config}} {{dtype}} on {{weight_dtype}}: {{type(exc).__name__}}: "
                                f"{{str(exc)[:300]}}")
# split-K's second kernel (linear_lut_gemm's sum of the float32 planes, bias, one cast)
import triton
from triton.compiler import ASTSource
from nf4_explorer.linear_lut_gemm import _SUM_CONFIG, sum_splits_kernel
for dtype in ("*bf16", "*fp16"):
    for split, bias in ((2, True), (8, False)):
        tried += 1
        signature = {{"part_ptr": "*fp32", "bias_ptr": dtype, "out_ptr": dtype, "M": "i32", "N": "i32",
                     "SPLIT_K": "constexpr", "HAS_BIAS": "constexpr", "BLOCK": "constexpr"}}
        source = ASTSource(sum_splits_kernel, signature,
                           constexprs={{"SPLIT_K": split, "HAS_BIAS": bias, "BLOCK": _SUM_CONFIG["BLOCK"]}})
        try:
            triton.compile(source, target=TARGETS["{target}"], options={{"num_warps": _SUM_CONFIG["num_warps"]}})
        except Exception as exc:
            failures.append(f"sum_splits_kernel {{dtype}} SPLIT_K={{split}}: {{type(exc).__name__}}: {{str(exc)[:300]}}")
print(json.dumps({{"tried": tried, "failures": failures}}))
"""
    report = json.loads(_run(["-c", code]).strip().splitlines()[-1])
    assert report["tried"] >= 22 and not report["failures"], "\n".join(report["failures"])


DRAIN_PTX = """
import json, re, nf4_explorer
from nf4_explorer.tuner.aot import TARGETS, compile_config, supports
copying, undrained = [], []
for name in nf4_explorer.names(family=None):
    variant = nf4_explorer.get(name)
    if variant.kernel is None or not supports(name, "sm_90"):
        continue
    ptx = compile_config(name, variant.default_config(64), TARGETS["sm_90"]).asm["ptx"]
    if "cp.async.commit_group" in ptx:
        copying.append(name)
        if not re.search(r"cp\\.async\\.wait_(group\\s+0|all)\\s*;", ptx):
            undrained.append(name)
print(json.dumps({"copying": copying, "undrained": undrained}))
"""


def test_cp_async_rings_are_drained():
    """A kernel that copies with cp.async waits for all its copy groups somewhere (``wait_group 0``):
    rings that run ahead of the last K step leave zero-filling copies in flight, which must land
    before the program ends and its shared memory goes to the next program on the SM (the Gluon
    kernels drain them explicitly; Triton's pipeliner does it for tl kernels). A presence check on
    the sm_90 PTX of every variant's default config, not a proof for every path."""
    report = json.loads(_run(["-c", DRAIN_PTX]).strip().splitlines()[-1])
    assert {"linear_gemv_gluon", "linear_wgmma", "phase_split"} <= set(report["copying"]), report
    assert not report["undrained"], f"cp.async groups never drained in {report['undrained']}"


CHECK_PTX = """
import sys, nf4_explorer
from nf4_explorer.tuner.aot import TARGETS, compile_config
name = sys.argv[1]
ptx = compile_config(name, nf4_explorer.get(name).default_config(64), TARGETS["sm_90"]).asm["ptx"]
vector_stores = [l for l in ptx.splitlines() if "st.global" in l and (".v2." in l or ".v4." in l)]
print(int("fma.rn.f32" in ptx), int(bool(vector_stores)))
"""


@pytest.mark.parametrize("name", nf4_explorer.names())
def test_no_fused_multiply_add_and_vector_stores_on_hopper(name):
    """The double-quant absmax must round the multiply and the add separately (as bitsandbytes
    does), and the bfloat16 output must be written with vector stores for aligned sizes (a variant
    may still store a short tail element by element)."""
    has_fma, has_wide_store = _run(["-c", CHECK_PTX, name]).split()
    assert has_fma == "0", f"{name}: PTX contains fma.rn.f32"
    assert has_wide_store == "1", f"{name}: no vector output stores in PTX"


PAIR_PTX = """
import json, nf4_explorer
from nf4_explorer.tuner.aot import TARGETS, compile_config
counts = {}
for name in ("linear_gemv_gluon", "linear_mma_gemv", "linear_wgmma"):
    for quant_type in ("nf4", "fp4"):
        for weight_dtype in ("bfloat16", "float16"):
            ptx = compile_config(name, nf4_explorer.get(name).default_config(64), TARGETS["sm_90"], out_dtype="float16",
                                 weight_dtype=weight_dtype, quant_type=quant_type).asm["ptx"]
            counts[f"{name} {quant_type} {weight_dtype}"] = ptx.count("cvt.rn.bf16x2.f32")
print(json.dumps(counts))
"""


def test_a_float16_x_on_a_bfloat16_weight_decodes_from_block_tables():
    """linear_gemv_gluon, linear_mma_gemv and linear_wgmma take a float16 x on a bfloat16 weight by
    building a table of each block's exact bfloat16 weights (``_decode.block_planes``: the one place
    their sm_90 PTX rounds to bfloat16); on a float16 weight they decode on x's grid as before. The
    values are checked on the GPU (tests/test_linear.py)."""
    counts = json.loads(_run(["-c", PAIR_PTX]).strip().splitlines()[-1])
    for key, count in counts.items():
        assert (count > 0) == key.endswith("bfloat16"), counts


SUM_AT_ONE = """
import json, triton
from triton.compiler import ASTSource
from nf4_explorer.linear_lut_gemm import _SUM_CONFIG, sum_splits_kernel
from nf4_explorer.tuner.aot import TARGETS
failures = []
for m, n in ((1, 4096), (4096, 1), (1, 1)):
    signature = {"part_ptr": "*fp32", "bias_ptr": "*bf16", "out_ptr": "*bf16", "M": "constexpr", "N": "constexpr",
                 "SPLIT_K": "constexpr", "HAS_BIAS": "constexpr", "BLOCK": "constexpr"}
    source = ASTSource(sum_splits_kernel, signature, constexprs={"M": m, "N": n, "SPLIT_K": 2, "HAS_BIAS": True,
                                                                 "BLOCK": _SUM_CONFIG["BLOCK"]})
    try:
        triton.compile(source, target=TARGETS["sm_90"], options={"num_warps": _SUM_CONFIG["num_warps"]})
    except Exception as exc:
        failures.append(f"M = {m}, N = {n}: {type(exc).__name__}: {str(exc)[-200:]}")
print(json.dumps(failures))
"""


def test_split_k_sum_compiles_for_one_row():
    """Triton passes an integer argument equal to 1 as a compile-time constant: split-K's sum kernel
    must compile with M = 1 (a forced split-K config at M = 1 failed to compile on the H200, run S19.3)."""
    failures = json.loads(_run(["-c", SUM_AT_ONE]).strip().splitlines()[-1])
    assert not failures, failures


FIT_CHECK = """
import json, nf4_explorer
from nf4_explorer.phase_split import SHARED_BYTES_PER_SM
from nf4_explorer.tuner.aot import TARGETS, compile_config
over = []
for blocksize in (32, 64, 256, 4096):
    for double_quant in (True, False):
        for config in nf4_explorer.get("phase_split").configs(blocksize):
            shared = compile_config("phase_split", config, TARGETS["sm_90"], blocksize=blocksize,
                                    double_quant=double_quant).metadata.shared
            if shared * config["CTAS_PER_SM"] > SHARED_BYTES_PER_SM:
                over.append((blocksize, double_quant, config, shared))
print(json.dumps(over))
"""


@pytest.mark.slow
def test_phase_split_configs_fit_shared_memory():
    """Every allowed phase_split config, in every absmax format, fits its programs per SM in the
    H100's shared memory (float32 absmax takes more room: the kernel then stages fewer chunks)."""
    over = json.loads(_run(["-c", FIT_CHECK]).strip().splitlines()[-1])
    assert not over, over


@pytest.mark.slow
def test_a_config_register_cap_reaches_ptxas():
    """``maxnreg`` in a config (a warp-specialized variant's) is a compile option, not a constexpr."""
    code = """
import nf4_explorer
from nf4_explorer.tuner.aot import TARGETS, compile_config
if "linear_wgmma_ws" not in nf4_explorer.names(family="linear"):
    print("unavailable")
else:
    # 8 warps in all: Triton's own cap would be 65536 / 256 = 256 registers
    config = {**nf4_explorer.get("linear_wgmma_ws").default, "BLOCK_N": 64, "BLOCK_M": 128, "num_warps": 4,
              "PRODUCER_WARPS": 4, "PRODUCER_REGS": 96, "maxnreg": 128}
    print(".maxnreg 128" in compile_config("linear_wgmma_ws", config, TARGETS["sm_90"]).asm["ptx"])
"""
    result = _run(["-c", code]).strip().splitlines()[-1]
    if result == "unavailable":
        pytest.skip("linear_wgmma_ws needs Triton 3.6 with Gluon")
    assert result == "True"
