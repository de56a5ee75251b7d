"""interleaved_store: flat tiles of BLOCK bytes; high and low nibbles decode as two vectors that
tl.interleave joins, so every store is contiguous and wide."""

import triton
import triton.language as tl

from ._decode import dequantize_codes, to_output
from ._registry import Variant, register


@triton.jit
def interleaved_store_kernel(
    packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr, out_ptr,
    n, n_rows, n_cols,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, QUANT_TYPE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr, TABLE_IN_REGISTERS: tl.constexpr, BLOCK: tl.constexpr,
):
    byte_idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    n_bytes = (n + 1) // 2
    byte_mask = byte_idx < n_bytes
    byte = tl.load(packed_ptr + byte_idx, mask=byte_mask, other=0).to(tl.int32)
    # Both nibbles of a byte lie in one quantization block (BLOCKSIZE is even).
    block = byte_idx // (BLOCKSIZE // 2)
    high = dequantize_codes(
        byte >> 4, block, byte_mask, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr,
        NESTED_BLOCKSIZE, QUANT_TYPE, DOUBLE_QUANT, TABLE_IN_REGISTERS,
    )
    low = dequantize_codes(
        byte & 0xF, block, byte_mask, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr,
        NESTED_BLOCKSIZE, QUANT_TYPE, DOUBLE_QUANT, TABLE_IN_REGISTERS,
    )
    values = tl.interleave(high, low)
    idx = tl.program_id(0).to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + idx, to_output(values, out_ptr), mask=idx < n)


def _grid(args, config):
    return (triton.cdiv((args.n + 1) // 2, config["BLOCK"]),)


register(Variant(
    name="interleaved_store",
    kernel=interleaved_store_kernel,
    grid=_grid,
    space={
        "BLOCK": (1024, 2048, 4096),
        "TABLE_IN_REGISTERS": (True, False),
        "num_warps": (2, 4, 8),
    },
    default={"BLOCK": 4096, "TABLE_IN_REGISTERS": False, "num_warps": 4},
    description="flat byte tiles, high/low nibbles decoded as two vectors joined by tl.interleave",
))
