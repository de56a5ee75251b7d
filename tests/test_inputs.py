"""Reliability, inputs layer: every malformed state, out and config is one clear error naming the
field and the fix; an out that overlaps an input is refused for every variant (never a wrong
result); grids past CUDA's limits are refused before a launch. One row per case."""

import numpy as np
import pytest
import torch

import nf4_explorer
from nf4_explorer import _launch
from nf4_explorer._format import prepare
from helpers import assert_bit_equal, skip_if_unavailable


@pytest.fixture
def problem(device):
    weight = torch.randn(16, 256, dtype=torch.bfloat16, device=device)
    return nf4_explorer.quantize(weight, blocksize=64, double_quant=True)


def _set(path, value):
    def mutate(state):
        owner = state.state2 if path.startswith("state2.") else state
        setattr(owner, path.split(".")[-1], value)
    return mutate


STATE_CASES = [
    ("shape None", _set("shape", None), TypeError, "state.shape must be a torch.Size or a sequence of ints"),
    ("shape 512", _set("shape", 512), TypeError, "state.shape must be a torch.Size or a sequence of ints"),
    ("shape floats", _set("shape", (16.0, 256.0)), TypeError, "state.shape must be a torch.Size or a sequence of ints"),
    ("shape negative", _set("shape", (-16, -256)), ValueError, "negative dimension"),
    ("blocksize None", _set("blocksize", None), TypeError, "state.blocksize must be an int"),
    ("blocksize float", _set("blocksize", 64.0), TypeError, "state.blocksize must be an int"),
    ("dtype string", _set("dtype", "bfloat16"), TypeError, "state.dtype must be a torch.dtype"),
    ("quant_type None", _set("quant_type", None), TypeError, "state.quant_type must be a string"),
    ("state2 without code", _set("state2.code", None), TypeError, "state.state2.code is missing or None"),
    ("state2 absmax None", _set("state2.absmax", None), TypeError, "state.state2.absmax is missing or None"),
    ("state2 code a list", _set("state2.code", [0.0] * 256), TypeError, "state.state2.code must be a torch.Tensor"),
    ("state2 blocksize None", _set("state2.blocksize", None), TypeError, "state.state2.blocksize is missing or None"),
]


@pytest.mark.parametrize("mutate, error, fragment", [c[1:] for c in STATE_CASES], ids=[c[0] for c in STATE_CASES])
def test_malformed_state(problem, mutate, error, fragment):
    packed, state = problem
    mutate(state)
    with pytest.raises(error, match=fragment):
        nf4_explorer.dequantize(packed, state)


OUT_CASES = [
    ("a list", lambda d: [0.0] * 4096, TypeError, "out must be a torch.Tensor or None, got list"),
    ("a numpy array", lambda d: np.zeros((16, 256), dtype=np.float32), TypeError, "got ndarray"),
]


@pytest.mark.parametrize("make_out, error, fragment", [c[1:] for c in OUT_CASES], ids=[c[0] for c in OUT_CASES])
def test_out_that_is_not_a_tensor(problem, device, make_out, error, fragment):
    packed, state = problem
    with pytest.raises(error, match=fragment):
        nf4_explorer.dequantize(packed, state, out=make_out(device))


def test_meta_tensors(problem):
    packed, state = problem
    with pytest.raises(ValueError, match="packed is a meta tensor"):
        nf4_explorer.dequantize(packed.to("meta"), state)


CONFIG_CASES = [
    ("WORDS float", {"WORDS": 512.0}, "WORDS=512.0 is outside the search space"),
    ("TABLE_IN_REGISTERS int", {"TABLE_IN_REGISTERS": 1}, "TABLE_IN_REGISTERS=1 is outside the search space"),
    ("num_warps 0", {"num_warps": 0}, "num_warps=0 is outside the search space"),
    ("num_warps -4", {"num_warps": -4}, "num_warps=-4 is outside the search space"),
    ("num_warps 3", {"num_warps": 3}, "num_warps=3 is outside the search space"),
    ("num_warps '4'", {"num_warps": "4"}, "num_warps='4' is outside the search space"),
    ("num_warps None", {"num_warps": None}, "num_warps=None is outside the search space"),
    ("num_warps float", {"num_warps": 4.0}, "num_warps=4.0 is outside the search space"),
]


@pytest.mark.parametrize("change, fragment", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_values(problem, change, fragment):
    packed, state = problem
    config = {**nf4_explorer.get("word_unpack").default_config(64), **change}
    with pytest.raises(ValueError, match=fragment):
        nf4_explorer.dequantize(packed, state, variant="word_unpack", config=config)


def _configs(name):
    variant = nf4_explorer.get(name)
    default = variant.default_config(64)
    others = [c for c in variant.configs(64) if c != default]
    return [default, others[0], others[-1]]


@pytest.mark.parametrize("name", nf4_explorer.names())
@pytest.mark.parametrize("victim", ["packed", "absmax"])
def test_out_overlapping_an_input_is_refused(problem, device, name, victim):
    """The reported defect: out viewed over packed's (or a float32 absmax's) memory. Every variant, at
    its default and two more configs, and the dispatcher refuse it; the input is left as it was."""
    skip_if_unavailable(name, device)
    if victim == "packed":
        weight = torch.randn(16, 256, dtype=torch.float32, device=device)
        packed, state = nf4_explorer.quantize(weight, blocksize=64, double_quant=False)
        state.dtype = torch.float16
        # 4096 half-precision outputs over a buffer that starts with the 2048 packed bytes.
        buffer = torch.zeros(4096 * 2, dtype=torch.uint8, device=device)
        buffer[: packed.numel()] = packed.reshape(-1)
        packed_view = buffer[: packed.numel()].view(packed.shape)
        out = buffer.view(torch.float16).view(16, 256)
    else:
        weight = torch.randn(4, 64, dtype=torch.float32, device=device)
        packed_view, state = nf4_explorer.quantize(weight, blocksize=64, double_quant=False)
        out = torch.empty(4, 64, dtype=torch.float32, device=device)
        state.absmax = out.view(-1)[: state.absmax.numel()]
    before = packed_view.clone()
    for config in _configs(name):
        with pytest.raises(ValueError, match=f"out overlaps {'packed' if victim == 'packed' else 'state.absmax'}"):
            nf4_explorer.dequantize(packed_view, state, out=out, variant=name, config=config)
    with pytest.raises(ValueError, match="out overlaps"):
        nf4_explorer.dequantize(packed_view, state, out=out)
    assert_bit_equal(packed_view, before, "packed after the refusal")


def test_out_next_to_an_input_is_accepted(problem, device):
    """Adjacent, not overlapping: one buffer holding packed then out is fine."""
    packed, state = problem
    n_bytes = packed.numel()
    buffer = torch.empty(n_bytes + 16 * 256 * 2, dtype=torch.uint8, device=device)
    buffer[:n_bytes] = packed.reshape(-1)
    out = buffer[n_bytes:].view(torch.bfloat16).view(16, 256)
    nf4_explorer.dequantize(buffer[:n_bytes].view(packed.shape), state, out=out)
    assert_bit_equal(out, nf4_explorer.reference_dequantize(packed, state))


@pytest.mark.parametrize("grid, fragment", [
    ((2**31,), "2147483648 programs on grid axis 0"),
    ((1, 65536), "65536 programs on grid axis 1"),
    ((2**31 - 1, 65535, 65535), None),
])
def test_grid_limits(grid, fragment):
    if fragment is None:
        _launch.check_grid(grid, "x")
        return
    with pytest.raises(ValueError, match=fragment):
        _launch.check_grid(grid, "per_row")


@pytest.mark.parametrize("name, shape", [("per_row", (2**31, 1)), ("tiled_2d", (1, 2**31))])
def test_forced_variant_on_a_weight_past_the_grid_limit(name, shape, device):
    """2^31 elements (1 GiB of codes, never touched): the forced variant's grid would pass CUDA's
    limits; it is refused before any launch, the default variant's grid fits."""
    n = shape[0] * shape[1]
    packed = torch.empty((n // 2, 1), dtype=torch.uint8, device=device)
    state = nf4_explorer.QuantState(absmax=torch.empty(n // 4096, device=device), shape=torch.Size(shape),
                                    dtype=torch.bfloat16, blocksize=4096)
    args = prepare(packed, state, None, allocate=False)
    variant = nf4_explorer.get(name)
    with pytest.raises(ValueError, match="programs on grid axis"):
        variant.launch(args, variant.default_config(4096))
    default = nf4_explorer.get("word_unpack")
    _launch.check_grid(default.grid(args, default.default_config(4096)), "word_unpack")
