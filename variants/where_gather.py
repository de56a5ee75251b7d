"""where_gather: one lane per output element; the nibble of byte i//2 is chosen with tl.where on
the parity of i."""

import triton
import triton.language as tl

from ._decode import dequantize_codes, to_output
from ._registry import Variant, register


@triton.jit
def where_gather_kernel(
    packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr, out_ptr,
    n, n_rows, n_cols,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, QUANT_TYPE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr, TABLE_IN_REGISTERS: tl.constexpr, BLOCK: tl.constexpr,
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    byte = tl.load(packed_ptr + (idx >> 1), mask=mask, other=0).to(tl.int32)
    codes = tl.where((idx & 1) == 0, byte >> 4, byte & 0xF)
    values = dequantize_codes(
        codes, idx // BLOCKSIZE, mask, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr,
        NESTED_BLOCKSIZE, QUANT_TYPE, DOUBLE_QUANT, TABLE_IN_REGISTERS,
    )
    tl.store(out_ptr + idx, to_output(values, out_ptr), mask=mask)


def _grid(args, config):
    return (triton.cdiv(args.n, config["BLOCK"]),)


register(Variant(
    name="where_gather",
    kernel=where_gather_kernel,
    grid=_grid,
    space={
        "BLOCK": (512, 1024, 2048, 4096),
        "TABLE_IN_REGISTERS": (True, False),
        "num_warps": (2, 4, 8),
    },
    default={"BLOCK": 2048, "TABLE_IN_REGISTERS": False, "num_warps": 2},
    description="flat, one lane per element, nibble picked by tl.where on parity",
))
