"""Every registered variant, several configs of its space, every format option: output EXACTLY equal
to the reference (torch.equal), on random data, into a poisoned output buffer.

On a machine without a GPU this runs in Triton's interpreter (conftest.py), so shapes are tiny but
awkward: odd n, n not a multiple of the blocksize, one element, rows not a multiple of the tile,
more than 256 blocks (two double-quant groups).
"""

import pytest
import torch

import nf4_explorer
from helpers import assert_bit_equal, poisoned, skip_if_unavailable

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCKSIZES = (32, 64, 256, 4096)
SHAPES = ((1,), (3, 37), (7, 129), (3, 1500), (9, 1000))


def sample_configs(variant, blocksize):
    """The default, the smallest and the largest config, and one with the other table decode."""
    configs = variant.configs(blocksize)
    default = variant.default_config(blocksize)
    other_decode = next((c for c in configs if c.get("TABLE_IN_REGISTERS") != default.get("TABLE_IN_REGISTERS")),
                        default)
    picked = [default, configs[0], configs[-1], other_decode]
    return [c for i, c in enumerate(picked) if c not in picked[:i]]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "fp32absmax"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", nf4_explorer.names())
def test_variant_exact(name, dtype, double_quant, quant_type, device):
    skip_if_unavailable(name, device)
    variant = nf4_explorer.get(name)
    for blocksize in BLOCKSIZES:
        for shape in SHAPES:
            weight = torch.randn(shape, dtype=dtype, device=device) * 3
            packed, state = nf4_explorer.quantize(weight, blocksize=blocksize, double_quant=double_quant, quant_type=quant_type)
            expected = nf4_explorer.reference_dequantize(packed, state)
            for config in sample_configs(variant, blocksize):
                out = poisoned(shape, dtype, device)
                result = nf4_explorer.dequantize(packed, state, out=out, variant=name, config=config)
                assert result is out
                assert_bit_equal(out, expected, f"{name} {config} bs={blocksize} shape={shape}")


@pytest.mark.parametrize("name", nf4_explorer.names())
def test_variant_allocates_output_and_accepts_2d_packed(name, device):
    skip_if_unavailable(name, device)
    weight = torch.randn(6, 96, dtype=torch.bfloat16, device=device)
    packed, state = nf4_explorer.quantize(weight, blocksize=32)
    expected = nf4_explorer.reference_dequantize(packed, state)
    result = nf4_explorer.dequantize(packed.view(6, 48), state, variant=name)
    assert result.shape == weight.shape and result.dtype == weight.dtype
    assert_bit_equal(result, expected, name)


def test_non_contiguous_packed_is_copied(device):
    weight = torch.randn(4, 64, dtype=torch.float16, device=device)
    packed, state = nf4_explorer.quantize(weight, blocksize=64)
    strided = torch.stack([packed.view(4, 32), packed.view(4, 32)], dim=2)[..., 0]  # same bytes, not contiguous
    assert not strided.is_contiguous()
    assert_bit_equal(nf4_explorer.dequantize(strided, state), nf4_explorer.reference_dequantize(packed, state))


def test_reference_matches_formula_on_a_hand_built_state():
    # Two blocks of 32, fp32 absmax; element 2i is the high nibble of byte i.
    codes = torch.arange(64) % 16
    packed = ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8).reshape(-1, 1)
    absmax = torch.tensor([2.0, 0.5])
    state = nf4_explorer.QuantState(absmax=absmax, shape=torch.Size([64]), dtype=torch.float32, blocksize=32, quant_type="nf4")
    table = torch.tensor(nf4_explorer._format.NF4_TABLE)
    expected = table[codes] * absmax.repeat_interleave(32)
    assert_bit_equal(nf4_explorer.reference_dequantize(packed, state), expected)


def test_double_quant_absmax_rounds_multiply_then_add():
    # float32(code2[q] * absmax2) + offset, two roundings: with these values a fused multiply-add
    # would give a different last bit.
    from nf4_explorer._reference import reference_absmax

    code2 = torch.zeros(256)
    code2[1] = 1.0 + 2**-23
    state2 = nf4_explorer.QuantState(absmax=torch.tensor([1.0 + 2**-23]), shape=torch.Size([1]), dtype=torch.float32, code=code2,
                                 blocksize=256)
    state = nf4_explorer.QuantState(absmax=torch.tensor([1], dtype=torch.uint8), shape=torch.Size([32]),
                                dtype=torch.float32, blocksize=32, offset=torch.tensor(-1.0), state2=state2)
    product = torch.tensor(1.0 + 2**-23) * torch.tensor(1.0 + 2**-23)  # rounds to 1 + 2**-22
    assert reference_absmax(state).item() == (product - 1.0).item() == 2**-22


@pytest.mark.parametrize("name", nf4_explorer.names())
def test_variant_follows_the_shared_kernel_interface(name):
    """The launcher passes the runtime arguments first, in this order, then constexprs by name."""
    variant = nf4_explorer.get(name)
    arg_names = variant.kernel.arg_names
    assert arg_names[:10] == ["packed_ptr", "absmax_ptr", "code2_ptr", "absmax2_ptr", "offset_ptr", "table_ptr",
                              "out_ptr", "n", "n_rows", "n_cols"]
    assert arg_names[10:14] == ["BLOCKSIZE", "NESTED_BLOCKSIZE", "QUANT_TYPE", "DOUBLE_QUANT"]
    assert set(arg_names[14:]) == set(variant.space) - {"num_warps", "num_stages"}


@pytest.mark.parametrize("name", nf4_explorer.names())
def test_variant_exact_on_unaligned_views(name, device):
    """State tensors and ``out`` that are views starting off a 16-byte boundary (slices of larger
    buffers): the same bits. Kernels read the absmax codes as 32-bit words (a misaligned access would
    be a sticky CUDA error), so validation gives such tensors a buffer of their own."""
    skip_if_unavailable(name, device)
    weight = torch.randn((9, 1000), dtype=torch.bfloat16, device=device) * 3
    packed, state = nf4_explorer.quantize(weight, blocksize=64, double_quant=True, quant_type="nf4")
    expected = nf4_explorer.reference_dequantize(packed, state)

    def shifted(t, by):  # the same values, at ``by`` elements into a buffer of their own
        buffer = torch.empty(t.numel() + by, dtype=t.dtype, device=t.device)
        buffer[by:] = t.flatten()
        return buffer[by:].view(t.shape)

    state.absmax, state.state2.code, state.state2.absmax = (
        shifted(state.absmax, 3), shifted(state.state2.code, 1), shifted(state.state2.absmax, 1))
    packed = shifted(packed, 5)
    assert all(t.data_ptr() % 16 for t in (packed, state.absmax, state.state2.code, state.state2.absmax))
    for _ in range(2):  # the first call compiles, the second takes the kept launch
        out = shifted(poisoned(tuple(state.shape), torch.bfloat16, device), 1)
        nf4_explorer.dequantize(packed, state, out=out, variant=name)
        assert_bit_equal(out, expected, f"{name}, unaligned state tensors and out")
