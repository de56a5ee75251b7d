"""GPU tests (marker `gpu`): exactness at LLM sizes and bit-equality with bitsandbytes' CUDA kernels."""

import random

import pytest
import torch

import nf4_explorer
from helpers import assert_bit_equal, poisoned, skip_if_unavailable

pytestmark = pytest.mark.gpu

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@pytest.mark.parametrize("name", nf4_explorer.names())
@pytest.mark.parametrize("shape", [(14336, 4096), (4096, 14336), (1024, 4096)])
def test_llm_size_exact(name, shape):
    skip_if_unavailable(name, "cuda")
    weight = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    packed, state = nf4_explorer.quantize(weight, blocksize=64, double_quant=True)
    expected = nf4_explorer.reference_dequantize(packed, state)
    out = poisoned(shape, torch.bfloat16, "cuda")
    nf4_explorer.dequantize(packed, state, out=out, variant=name)
    assert_bit_equal(out, expected, f"{name} {shape}")


FP4_THRESHOLDS = torch.tensor([0.29166667, 0.583333, 0.8333333, 0.4166667, 0.0859375, 0.20833333, 0.00260417])


def _assert_fp4_codes_differ_only_on_thresholds(weight, packed, bnb_packed, blocksize):
    """Known difference (README, Format): bitsandbytes 0.50.2's CUDA FP4 quantizer and ours pick
    different codes for elements whose scaled value lies within an ulp of a decision threshold
    (measured on an H100: ~20 per million float16 elements, ~460 per million bfloat16 elements,
    where exact ties are common). A difference anywhere else fails."""
    n = weight.numel()
    ours = torch.stack((packed.reshape(-1) >> 4, packed.reshape(-1) & 15), 1).reshape(-1)[:n]
    theirs = torch.stack((bnb_packed.reshape(-1) >> 4, bnb_packed.reshape(-1) & 15), 1).reshape(-1)[:n]
    bad = (ours != theirs).nonzero().reshape(-1)
    if bad.numel() == 0:
        return
    _, absmax = nf4_explorer._reference._blockwise_absmax(weight.reshape(-1).float(), blocksize)
    scaled = weight.reshape(-1).float()[bad] * (1.0 / absmax[bad // blocksize])
    distance = (scaled.abs()[:, None] - FP4_THRESHOLDS.to(scaled.device)[None, :]).abs().min(dim=1).values
    ulp = torch.finfo(torch.float32).eps * scaled.abs().clamp(min=2**-10)
    off = (distance > 2 * ulp).nonzero().reshape(-1)
    assert off.numel() == 0, f"FP4 codes differ away from thresholds at {bad[off][:8].tolist()}"


def _random_cases(count, seed):
    rng = random.Random(seed)
    for _ in range(count):
        rows, cols = rng.choice([1, 3, 17, 64, 511, 1024, 4096]), rng.choice([1, 31, 64, 255, 1000, 4096, 11008])
        yield (
            (rows, cols), rng.choice(DTYPES), rng.choice([32, 64, 128, 256, 512, 1024, 2048, 4096]),
            rng.choice([True, False]), rng.choice(["nf4", "fp4"]),
        )


@pytest.mark.parametrize("case", list(_random_cases(40, seed=7)), ids=str)
def test_bit_equal_with_bitsandbytes(case):
    bnb = pytest.importorskip("bitsandbytes.functional")
    shape, dtype, blocksize, double_quant, quant_type = case
    weight = torch.randn(shape, device="cuda", dtype=dtype) * 2.5
    bnb_packed, bnb_state = bnb.quantize_4bit(
        weight, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )
    packed, state = nf4_explorer.quantize(weight, blocksize=blocksize, double_quant=double_quant, quant_type=quant_type)
    if quant_type == "nf4":
        assert_bit_equal(packed, bnb_packed, "quantize bytes")
    else:
        _assert_fp4_codes_differ_only_on_thresholds(weight, packed, bnb_packed, blocksize)
    if double_quant:
        assert_bit_equal(state.absmax, bnb_state.absmax, "absmax codes")
        assert_bit_equal(state.state2.absmax, bnb_state.state2.absmax, "absmax2")
        assert_bit_equal(state.offset, bnb_state.offset, "offset")
    else:
        assert_bit_equal(state.absmax, bnb_state.absmax, "absmax")
    expected = bnb.dequantize_4bit(bnb_packed, bnb_state)
    for name in nf4_explorer.names("cuda"):
        out = poisoned(shape, dtype, "cuda")
        nf4_explorer.dequantize(bnb_packed, bnb_state, out=out, variant=name)
        assert_bit_equal(out, expected, f"{name} vs bitsandbytes {case}")
    assert_bit_equal(nf4_explorer.dequantize(bnb_packed, bnb_state), expected, "dispatcher vs bitsandbytes")
    assert_bit_equal(nf4_explorer.reference_dequantize(bnb_packed, bnb_state), expected, "reference vs bitsandbytes")


def _fresh_problem(shape=(1024, 4096), seed=0):
    torch.manual_seed(seed)
    weight = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    packed, state = nf4_explorer.quantize(weight, blocksize=64, double_quant=True)
    return packed, state, nf4_explorer.reference_dequantize(packed, state)


def test_fast_launch_serves_new_data_exactly():
    """The second call of a problem goes through the cached launcher (nf4_explorer/_launch.py) with
    the new call's pointers: new weights of the same shape, into a poisoned output, stay exact."""
    from nf4_explorer import _launch

    nf4_explorer.dequantize(*_fresh_problem(seed=1)[:2])  # compiles and remembers the launch
    ready_before = len(_launch._READY)
    assert ready_before > 0, "the first launch left no cached launcher"
    for seed in (2, 3):
        packed, state, expected = _fresh_problem(seed=seed)
        out = poisoned(tuple(state.shape), torch.bfloat16, "cuda")
        nf4_explorer.dequantize(packed, state, out=out)
        assert_bit_equal(out, expected, f"fast launch, seed {seed}")
    assert len(_launch._READY) == ready_before, "same problem, new cache entry: the fast path was not taken"


def test_launch_hooks_are_honoured():
    """A profiler's launch hook (Triton's knobs) sees every launch: the fast path steps aside."""
    knobs = pytest.importorskip("triton").knobs
    if not hasattr(knobs.runtime.launch_enter_hook, "add"):
        pytest.skip("this Triton has no HookChain launch hooks")
    packed, state, expected = _fresh_problem(seed=4)
    nf4_explorer.dequantize(packed, state)  # cached launcher ready
    seen = []
    hook = lambda metadata: seen.append(metadata)  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        out = poisoned(tuple(state.shape), torch.bfloat16, "cuda")
        nf4_explorer.dequantize(packed, state, out=out)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert len(seen) == 1
    assert_bit_equal(out, expected, "with a launch hook")


def test_unaligned_state_tensors_take_the_normal_launch():
    """absmax codes that start mid-allocation (not 16-byte aligned) are still read correctly."""
    packed, state, expected = _fresh_problem(seed=5)
    padded = torch.zeros(state.absmax.numel() + 3, dtype=torch.uint8, device="cuda")
    padded[3:] = state.absmax
    state.absmax = padded[3:]
    assert state.absmax.data_ptr() % 16
    for _ in range(2):
        out = poisoned(tuple(state.shape), torch.bfloat16, "cuda")
        nf4_explorer.dequantize(packed, state, out=out)
        assert_bit_equal(out, expected, "unaligned absmax")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_weights_on_another_gpu():
    """Weights spread over GPUs (device_map="auto") dequantize on their own GPU, whatever the
    current device is, through both the first (compiling) and the cached launch."""
    assert torch.cuda.current_device() == 0
    torch.manual_seed(6)
    weight = torch.randn((1024, 4096), device="cuda:1", dtype=torch.bfloat16)
    packed, state = nf4_explorer.quantize(weight, blocksize=64, double_quant=True)
    expected = nf4_explorer.reference_dequantize(packed, state)
    for _ in range(2):
        out = nf4_explorer.dequantize(packed, state)
        assert out.device == torch.device("cuda:1")
        assert_bit_equal(out, expected, "weights on cuda:1, current device cuda:0")
    bnb = pytest.importorskip("bitsandbytes.functional")
    assert_bit_equal(nf4_explorer.dequantize(packed, state), bnb.dequantize_4bit(packed, state), "vs bitsandbytes on cuda:1")


def _linear_problem(seed, n=256, k=512):
    torch.manual_seed(seed)
    packed, state = nf4_explorer.quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16), blocksize=64,
                                          double_quant=True)
    return packed, state


def _forced(x, packed, state, bias=None):
    """The same call through the full path (validation, dispatch, launch): the lean path's reference."""
    choice = nf4_explorer.explain_linear(x, packed, state)
    return nf4_explorer.linear(x, packed, state, bias, variant=choice.variant, config=choice.config)


PLANNED = {
    # what the dispatcher chooses: None for its own choice (one launch), else a tuned entry's
    "one launch": None,
    "dequantize + cuBLAS": ("linear_dequantize", {}),
    "split-K (two launches, a workspace)": ("linear_lut_gemm", {"SPLIT_K": 2}),
}


@pytest.mark.parametrize("planned", list(PLANNED))
def test_a_steady_linear_call_takes_the_lean_path(monkeypatch, planned):
    """The second call of a linear problem skips validation of x and the dispatcher (_dispatch's plans)
    and gives the full path's bits with its own x and weight, whatever the variant runs."""
    from nf4_explorer import _dispatch, _registry

    if PLANNED[planned] is not None:
        name, config = PLANNED[planned]
        variant = _registry.get(name)
        choice = _dispatch.Choice(name, {**variant.default_config(64), **config}, "tuned (exact)")
        monkeypatch.setattr(_dispatch, "_choose_linear", lambda args: choice)
    packed, state = _linear_problem(seed=6)
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    nf4_explorer.linear(x, packed, state)  # plans the problem
    resolved = []
    original = _dispatch._resolve
    # (linear_dequantize's run resolves its dequantize problem: the dequantize family's own memo)
    monkeypatch.setattr(_dispatch, "_resolve", lambda args, family, *a: resolved.append(family) or original(args, family, *a))
    for seed in (7, 8):
        packed, state = _linear_problem(seed=seed)
        x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
        resolved.clear()
        out = nf4_explorer.linear(x, packed, state)
        assert "linear" not in resolved, "a steady call went through the dispatcher"
        assert_bit_equal(out, _forced(x, packed, state), f"lean path, seed {seed}")


LEAN_CHANGES = {
    # name: (x, packed, state, bias) of a planned problem -> a call that must not reuse its plan blindly
    "more rows of x": lambda x, p, s, b: (torch.randn(9, 512, device="cuda", dtype=torch.bfloat16), p, s, b),
    "3-D x": lambda x, p, s, b: (x.view(2, 2, 512), p, s, b),
    "non-contiguous x": lambda x, p, s, b: (torch.randn(512, 4, device="cuda", dtype=torch.bfloat16).t(), p, s, b),
    "float16 x": lambda x, p, s, b: (x.half(), p, s, b),
    "a bias": lambda x, p, s, b: (x, p, s, torch.randn(256, device="cuda", dtype=torch.bfloat16)),
    "a bias off a 16-byte boundary": lambda x, p, s, b: (x, p, s, torch.randn(257, device="cuda",
                                                                              dtype=torch.bfloat16)[1:]),
    "a module's bias (a Parameter)": lambda x, p, s, b: (x, p, s, torch.nn.Parameter(
        torch.randn(256, device="cuda", dtype=torch.bfloat16), requires_grad=False)),
    "another weight format": lambda x, p, s, b: (x, *nf4_explorer.quantize(
        torch.randn(256, 512, device="cuda", dtype=torch.bfloat16), blocksize=128, quant_type="fp4"), b),
    "absmax given new data": lambda x, p, s, b: (setattr(s.absmax, "data", s.absmax.flip(0).contiguous()),
                                                 (x, p, s, b))[1],
}


@pytest.mark.parametrize("change", list(LEAN_CHANGES))
def test_the_lean_path_serves_only_the_same_problem(change):
    packed, state = _linear_problem(seed=9)
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    nf4_explorer.linear(x, packed, state)
    nf4_explorer.linear(x, packed, state)  # planned and served
    x, packed, state, bias = LEAN_CHANGES[change](x, packed, state, None)
    for call in range(2):  # the changed problem's first (full) and second (planned) call
        out = nf4_explorer.linear(x, packed, state, bias)
        assert_bit_equal(out, _forced(x, packed, state, bias), f"{change}, call {call}")


def test_a_call_with_an_unaligned_bias_leaves_the_plan_to_an_aligned_one():
    """A plan is made from an aligned call only: one made from a bias off a 16-byte boundary would
    keep no launch of its own (the fast launch takes aligned pointers), and every later call of the
    problem would pay the variant's full launch."""
    from nf4_explorer import _dispatch

    _dispatch.reset()
    packed, state = _linear_problem(seed=14)
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    unaligned = torch.randn(257, device="cuda", dtype=torch.bfloat16)[1:]
    aligned = unaligned.clone()
    nf4_explorer.linear(x, packed, state, unaligned)
    key = _dispatch._plan_key(x, nf4_explorer._format.prepare_weight(packed, state), aligned)
    assert key not in _dispatch._plans
    out = nf4_explorer.linear(x, packed, state, aligned)
    assert _dispatch._plans[key][0] is not None, "the plan kept no launch"
    assert_bit_equal(nf4_explorer.linear(x, packed, state, aligned), out, "planned call")
    assert_bit_equal(out, _forced(x, packed, state, aligned), "full path")


DEQUANTIZE_CHANGES = {
    # name: a planned weight -> (packed, state) of a call that must not reuse its plan blindly
    "another shape": lambda p, s: nf4_explorer.quantize(torch.randn(128, 512, device="cuda", dtype=torch.bfloat16),
                                                        blocksize=64, double_quant=True),
    "float16 output": lambda p, s: nf4_explorer.quantize(torch.randn(256, 512, device="cuda", dtype=torch.float16),
                                                         blocksize=64, double_quant=True),
    "fp4, blocksize 128": lambda p, s: nf4_explorer.quantize(torch.randn(256, 512, device="cuda", dtype=torch.bfloat16),
                                                             blocksize=128, quant_type="fp4", double_quant=True),
    "plain absmax": lambda p, s: nf4_explorer.quantize(torch.randn(256, 512, device="cuda", dtype=torch.bfloat16),
                                                       blocksize=64, double_quant=False),
    "absmax given new data": lambda p, s: (setattr(s.absmax, "data", s.absmax.flip(0).contiguous()), (p, s))[1],
}


def test_a_steady_dequantize_call_takes_the_lean_path(monkeypatch):
    """The second dequantization of a weight format and shape skips the dispatcher and gives the
    exact bits with its own weight, into a new output and into linear_dequantize's workspace."""
    from nf4_explorer import _dispatch

    packed, state = _linear_problem(seed=10)
    nf4_explorer.dequantize(packed, state)  # plans the format and shape
    x = torch.randn(3, 512, device="cuda", dtype=torch.bfloat16)
    nf4_explorer.linear(x, packed, state, variant="linear_dequantize")
    resolved = []
    original = _dispatch._resolve
    monkeypatch.setattr(_dispatch, "_resolve", lambda *a: resolved.append(1) or original(*a))
    for seed in (11, 12):
        packed, state = _linear_problem(seed=seed)
        resolved.clear()
        out = nf4_explorer.dequantize(packed, state)
        assert not resolved, "a steady dequantize call went through the dispatcher"
        assert_bit_equal(out, nf4_explorer.reference_dequantize(packed, state), f"lean dequantize, seed {seed}")
        expected = torch.nn.functional.linear(x, out)
        assert_bit_equal(nf4_explorer.linear(x, packed, state, variant="linear_dequantize"), expected,
                         f"linear_dequantize's workspace, seed {seed}")


@pytest.mark.parametrize("change", list(DEQUANTIZE_CHANGES))
def test_the_dequantize_lean_path_serves_only_the_same_format(change):
    packed, state = _linear_problem(seed=13)
    nf4_explorer.dequantize(packed, state)
    nf4_explorer.dequantize(packed, state)  # planned and served
    packed, state = DEQUANTIZE_CHANGES[change](packed, state)
    for call in range(2):  # the changed weight's first (full) and second (planned) call
        out = nf4_explorer.dequantize(packed, state)
        assert_bit_equal(out, nf4_explorer.reference_dequantize(packed, state), f"{change}, call {call}")
