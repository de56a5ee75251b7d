"""The format's constants and quantize(), against bitsandbytes itself where it is installed."""

import pytest
import torch

import nf4_explorer
from nf4_explorer import _format, _reference
from helpers import assert_bit_equal


def test_fp4_table_is_bitsandbytes_values_over_12_in_float32():
    values = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]) / 12.0
    assert_bit_equal(torch.tensor(_format.FP4_TABLE[:8]), values)
    assert _format.FP4_TABLE[8] == 0.0 and str(_format.FP4_TABLE[8]) == "-0.0"


def test_quantize_shape_and_nibble_order():
    weight = torch.tensor([[-1.0, 1.0, 0.0, 1.0]])
    packed, state = nf4_explorer.quantize(weight, blocksize=32, double_quant=False)
    # -1 -> code 0, 1 -> code 15, 0 -> code 7; element 0 in the high nibble.
    assert packed.shape == (2, 1)
    assert packed.reshape(-1).tolist() == [0x0F, 0x7F]
    assert state.absmax.tolist() == [1.0]


def test_quantize_odd_length_pads_with_the_code_of_zero():
    packed, _ = nf4_explorer.quantize(torch.tensor([1.0, -1.0, 0.5]), blocksize=32, double_quant=False)
    assert packed.numel() == 2
    assert packed.reshape(-1)[1].item() & 0xF == 7  # NF4 code of 0.0, as bitsandbytes' zero-filled load


@pytest.mark.parametrize("bad, error", [
    (dict(blocksize=48), ValueError), (dict(quant_type="int4"), ValueError),
])
def test_quantize_rejects_bad_arguments(bad, error):
    with pytest.raises(error, match="use one of"):
        nf4_explorer.quantize(torch.randn(64), **bad)


def test_quantize_rejects_integer_weights():
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        nf4_explorer.quantize(torch.ones(64, dtype=torch.int32))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU bitsandbytes in the interpreter; test_gpu.py covers CUDA")
class TestAgainstBitsandbytes:
    """bitsandbytes' own CPU functions (installed in CI), same bits."""

    bnb = pytest.importorskip("bitsandbytes.functional")

    def test_tables_and_dynamic_map(self):
        assert_bit_equal(_reference.table("nf4"), self.bnb.get_4bit_type("nf4", device="cpu"))
        assert_bit_equal(_reference.table("fp4"), self.bnb.get_4bit_type("fp4", device="cpu"))
        assert_bit_equal(_reference.dynamic_map(), self.bnb.create_dynamic_map())

    @pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
    @pytest.mark.parametrize("double_quant", [True, False])
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
    @pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
    def test_dequantize_bitsandbytes_state(self, quant_type, double_quant, dtype, blocksize):
        weight = torch.randn(9, 1000, dtype=dtype) * 2
        packed, state = self.bnb.quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant,
                                               quant_type=quant_type)
        expected = self.bnb.dequantize_4bit(packed, state)
        assert_bit_equal(nf4_explorer.reference_dequantize(packed, state), expected, "reference")
        for name in nf4_explorer.names(expected.device):
            out = torch.full_like(expected, float("nan"))
            nf4_explorer.dequantize(packed, state, out=out, variant=name)
            assert_bit_equal(out, expected, name)

    @pytest.mark.parametrize("double_quant", [True, False])
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
    def test_nf4_quantize_same_bytes_as_bitsandbytes_cpu(self, double_quant, dtype):
        # bitsandbytes' CPU NF4 quantizer picks the nearest table entry, which is what the CUDA
        # decision tree computes too. (Its CPU FP4 quantizer uses a table rounded to 4 digits and
        # differs from the CUDA kernel; FP4 bytes are compared with CUDA in test_gpu.py.)
        weight = torch.randn(33, 517, dtype=dtype)
        packed, state = nf4_explorer.quantize(weight, blocksize=64, double_quant=double_quant)
        bnb_packed, bnb_state = self.bnb.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant,
                                                       quant_type="nf4")
        assert_bit_equal(packed, bnb_packed, "packed")
        assert_bit_equal(state.absmax, bnb_state.absmax, "absmax")
        if double_quant:
            assert_bit_equal(state.state2.absmax, bnb_state.state2.absmax, "absmax2")
            assert_bit_equal(state.offset, bnb_state.offset, "offset")

