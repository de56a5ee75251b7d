"""block_tile: tiles of ROWS x BYTES packed bytes in which every tile row lies inside one
quantization block, so each absmax is loaded and decoded once per tile row and broadcast, instead
of once per element; nibbles are joined with tl.interleave for wide contiguous stores."""

import triton
import triton.language as tl

from ._decode import decode_code, load_absmax, to_output
from ._registry import Variant, register


@triton.jit
def block_tile_kernel(
    packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr, out_ptr,
    n, n_rows, n_cols,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, QUANT_TYPE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr, TABLE_IN_REGISTERS: tl.constexpr,
    ROWS: tl.constexpr, BYTES: tl.constexpr,
):
    tile_start = tl.program_id(0).to(tl.int64) * (ROWS * BYTES)
    row_start = tile_start + tl.arange(0, ROWS) * BYTES  # first byte of each tile row
    byte_idx = row_start[:, None] + tl.arange(0, BYTES)[None, :]
    n_bytes = (n + 1) // 2
    byte_mask = byte_idx < n_bytes
    byte = tl.load(packed_ptr + byte_idx, mask=byte_mask, other=0).to(tl.int32)
    # BYTES divides BLOCKSIZE // 2 (see `allowed`), so one absmax per tile row.
    absmax = load_absmax(
        absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, row_start // (BLOCKSIZE // 2), row_start < n_bytes, 0,
        NESTED_BLOCKSIZE, DOUBLE_QUANT, False,
    )
    high = decode_code(byte >> 4, table_ptr, QUANT_TYPE, TABLE_IN_REGISTERS) * absmax[:, None]
    low = decode_code(byte & 0xF, table_ptr, QUANT_TYPE, TABLE_IN_REGISTERS) * absmax[:, None]
    values = tl.interleave(high, low)  # [ROWS, 2 * BYTES]
    idx = 2 * row_start[:, None] + tl.arange(0, 2 * BYTES)[None, :]
    tl.store(out_ptr + idx, to_output(values, out_ptr), mask=idx < n)


def _grid(args, config):
    return (triton.cdiv((args.n + 1) // 2, config["ROWS"] * config["BYTES"]),)


register(Variant(
    name="block_tile",
    kernel=block_tile_kernel,
    grid=_grid,
    space={
        "ROWS": (16, 32, 64, 128),
        "BYTES": (16, 32, 64),
        "TABLE_IN_REGISTERS": (True, False),
        "num_warps": (2, 4, 8),
    },
    default={"ROWS": 64, "BYTES": 32, "TABLE_IN_REGISTERS": False, "num_warps": 4},
    description="ROWS x BYTES byte tiles, one absmax per tile row, interleaved wide stores",
    allowed=lambda config, blocksize: (
        config["BYTES"] <= blocksize // 2
    ),
))
