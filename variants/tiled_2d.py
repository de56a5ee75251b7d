"""tiled_2d: a 2-D grid of BLOCK_M x BLOCK_N tiles of the [n_rows, n_cols] weight."""

import triton
import triton.language as tl

from ._decode import dequantize_codes, element_codes, to_output
from ._registry import Variant, register


@triton.jit
def tiled_2d_kernel(
    packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr, out_ptr,
    n, n_rows, n_cols,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, QUANT_TYPE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr, TABLE_IN_REGISTERS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    idx = rows[:, None] * n_cols + cols[None, :]
    codes = element_codes(packed_ptr, idx, mask)
    values = dequantize_codes(
        codes, idx // BLOCKSIZE, mask, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr,
        NESTED_BLOCKSIZE, QUANT_TYPE, DOUBLE_QUANT, TABLE_IN_REGISTERS,
    )
    tl.store(out_ptr + idx, to_output(values, out_ptr), mask=mask)


def _grid(args, config):
    return (triton.cdiv(args.n_rows, config["BLOCK_M"]), triton.cdiv(args.n_cols, config["BLOCK_N"]))


register(Variant(
    name="tiled_2d",
    kernel=tiled_2d_kernel,
    grid=_grid,
    space={
        "BLOCK_M": (1, 4, 16),
        "BLOCK_N": (128, 512, 1024),
        "TABLE_IN_REGISTERS": (True, False),
        "num_warps": (2, 4, 8),
    },
    default={"BLOCK_M": 1, "BLOCK_N": 1024, "TABLE_IN_REGISTERS": False, "num_warps": 2},
    description="2-D grid of BLOCK_M x BLOCK_N output tiles",
    allowed=lambda config, blocksize: config["BLOCK_M"] * config["BLOCK_N"] <= 8192,
))
