"""per_row: one program per weight row, walking the row in chunks of BLOCK_N elements."""

import triton
import triton.language as tl

from ._decode import dequantize_codes, element_codes, to_output
from ._registry import Variant, register


@triton.jit
def per_row_kernel(
    packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr, out_ptr,
    n, n_rows, n_cols,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, QUANT_TYPE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr, TABLE_IN_REGISTERS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row_start = tl.program_id(0).to(tl.int64) * n_cols
    for col_start in range(0, n_cols, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        mask = cols < n_cols
        idx = row_start + cols
        codes = element_codes(packed_ptr, idx, mask)
        values = dequantize_codes(
            codes, idx // BLOCKSIZE, mask, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr,
            NESTED_BLOCKSIZE, QUANT_TYPE, DOUBLE_QUANT, TABLE_IN_REGISTERS,
        )
        tl.store(out_ptr + idx, to_output(values, out_ptr), mask=mask)


def _grid(args, config):
    return (args.n_rows,)


register(Variant(
    name="per_row",
    kernel=per_row_kernel,
    grid=_grid,
    space={
        "BLOCK_N": (512, 1024, 2048, 4096),
        "TABLE_IN_REGISTERS": (True, False),
        "num_warps": (4, 8),
        "num_stages": (1, 2),
    },
    default={"BLOCK_N": 1024, "TABLE_IN_REGISTERS": False, "num_warps": 8, "num_stages": 2},
    description="one program per row, looping over the row in BLOCK_N chunks",
))
