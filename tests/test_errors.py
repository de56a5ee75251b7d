"""Bad input gets a clear error naming the problem and the fix; never a wrong result."""

import pytest
import torch

import nf4_explorer


@pytest.fixture
def problem(device):
    weight = torch.randn(4, 64, dtype=torch.bfloat16, device=device)
    return nf4_explorer.quantize(weight, blocksize=64, double_quant=True)


def test_wrong_packed_dtype(problem):
    packed, state = problem
    with pytest.raises(TypeError, match="packed must be torch.uint8"):
        nf4_explorer.dequantize(packed.to(torch.int16), state)


def test_packed_size_mismatch(problem):
    packed, state = problem
    with pytest.raises(ValueError, match=r"needs ceil\(256/2\) = 128"):
        nf4_explorer.dequantize(packed[:-1], state)


def test_absmax_length_mismatch(problem):
    packed, state = problem
    state.absmax = state.absmax[:-1]
    with pytest.raises(ValueError, match="blocksize or shape does not match its absmax"):
        nf4_explorer.dequantize(packed, state)


def test_unsupported_blocksize(problem):
    packed, state = problem
    state.blocksize = 48
    with pytest.raises(ValueError, match="unsupported blocksize 48"):
        nf4_explorer.dequantize(packed, state)


def test_unsupported_quant_type(problem):
    packed, state = problem
    state.quant_type = "int4"
    with pytest.raises(ValueError, match="unsupported quant_type 'int4'"):
        nf4_explorer.dequantize(packed, state)


def test_unsupported_output_dtype(problem):
    packed, state = problem
    state.dtype = torch.int8
    with pytest.raises(ValueError, match="unsupported output dtype"):
        nf4_explorer.dequantize(packed, state)


@pytest.mark.parametrize("bad_out, error, message", [
    (lambda d: torch.empty(4, 64, dtype=torch.float16, device=d), TypeError, "out has dtype torch.float16"),
    (lambda d: torch.empty(4, 65, dtype=torch.bfloat16, device=d), ValueError, "out has shape"),
    (lambda d: torch.empty(64, 4, dtype=torch.bfloat16, device=d).t(), ValueError, "out must be contiguous"),
])
def test_bad_out(problem, device, bad_out, error, message):
    packed, state = problem
    with pytest.raises(error, match=message):
        nf4_explorer.dequantize(packed, state, out=bad_out(device))


def test_out_on_another_device(problem, device):
    if device.type == "cpu":
        pytest.skip("needs a second device")
    packed, state = problem
    with pytest.raises(ValueError, match="out is on cpu but packed is on cuda"):
        nf4_explorer.dequantize(packed, state, out=torch.empty(4, 64, dtype=torch.bfloat16))


def test_cpu_tensors_without_interpreter(problem, monkeypatch):
    packed, state = problem
    if packed.is_cuda:
        packed, state = packed.cpu(), nf4_explorer.quantize(torch.randn(4, 64, dtype=torch.bfloat16), blocksize=64)[1]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        nf4_explorer.dequantize(packed, state)


def test_state_missing_fields(problem):
    packed, _ = problem
    with pytest.raises(TypeError, match="state has no absmax"):
        nf4_explorer.dequantize(packed, object())


def test_double_quant_without_offset(problem):
    packed, state = problem
    state.offset = None
    with pytest.raises(ValueError, match="no offset"):
        nf4_explorer.dequantize(packed, state)


def test_unknown_variant_lists_the_names(problem):
    packed, state = problem
    with pytest.raises(ValueError, match="registered variants are"):
        nf4_explorer.dequantize(packed, state, variant="nope")


def test_config_outside_space(problem):
    packed, state = problem
    with pytest.raises(ValueError, match="outside the search space"):
        nf4_explorer.dequantize(packed, state, variant="where_gather",
                            config={"BLOCK": 3, "TABLE_IN_REGISTERS": True, "num_warps": 4})


def test_config_with_unknown_key(problem):
    packed, state = problem
    with pytest.raises(ValueError, match="unknown keys"):
        nf4_explorer.dequantize(packed, state, variant="where_gather", config={"BLOCK": 1024, "FOO": 1})


def test_config_without_variant(problem):
    packed, state = problem
    with pytest.raises(ValueError, match="config= needs variant="):
        nf4_explorer.dequantize(packed, state, config={"BLOCK": 1024})


@pytest.mark.parametrize("where", ["state.absmax", "state.state2.code", "state.state2.absmax", "state.offset", "out"])
def test_state_tensor_on_another_device(problem, device, where):
    """Each of the state's tensors (and out) on another device is named in the error ("meta"
    stands in for a second device on a machine with one)."""
    packed, state = problem
    out = None
    if where == "out":
        out = torch.empty(4, 64, dtype=torch.bfloat16, device="meta")
    else:
        owner, attribute = (state.state2, where.rsplit(".", 1)[1]) if "state2" in where else (state, where.split(".")[1])
        setattr(owner, attribute, getattr(owner, attribute).to("meta"))
    with pytest.raises(ValueError, match=f"{where} is on meta but packed is on {device.type}"):
        nf4_explorer.dequantize(packed, state, out=out)


def test_variant_that_needs_a_newer_gpu_says_so(problem, device):
    """phase_split (Gluon, cp.async) cannot run in the interpreter or below compute capability 8.0:
    asking for it explicitly names the requirement; the dispatcher and the tuner never offer it there."""
    packed, state = problem
    reason = nf4_explorer.get("phase_split").unavailable_reason(device)
    if reason is None:
        pytest.skip("this GPU runs phase_split")
    with pytest.raises(ValueError, match="needs an NVIDIA GPU of compute capability 8.0 or newer"):
        nf4_explorer.dequantize(packed, state, variant="phase_split")
    assert "phase_split" not in nf4_explorer.names(device)
    assert "phase_split" in nf4_explorer.names()


def test_variant_module_for_a_newer_triton_is_left_out(monkeypatch):
    """Under a Triton without the Gluon this variant uses, its module raises VariantUnavailable,
    which the package's loader skips (the other variants load)."""
    import importlib

    import triton

    import nf4_explorer.phase_split

    monkeypatch.setattr(triton, "__version__", "3.5.0")
    with pytest.raises(nf4_explorer.VariantUnavailable, match="needs Triton 3.6 or newer"):
        importlib.reload(nf4_explorer.phase_split)


def test_gluon_linear_variant_that_cannot_run_here_says_so(device):
    """linear_gemv_gluon (Gluon, inline PTX) asked for in the interpreter or on a GPU below compute
    capability 8.0 names the requirement; the dispatcher never offers it there."""
    reason = nf4_explorer.get("linear_gemv_gluon").unavailable_reason(device)
    if reason is None:
        pytest.skip("this GPU runs linear_gemv_gluon")
    packed, state = nf4_explorer.quantize(torch.randn(16, 64, dtype=torch.bfloat16, device=device))
    x = torch.randn(2, 64, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="linear_gemv_gluon.*needs an NVIDIA GPU of compute capability 8.0"):
        nf4_explorer.linear(x, packed, state, variant="linear_gemv_gluon")
    assert "linear_gemv_gluon" not in nf4_explorer.names(device, family="linear")
