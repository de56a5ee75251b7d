"""word_unpack: each lane loads whole 32-bit words of packed codes (8 elements) and unpacks them
with a constant shift vector straight into output order: no interleave, no shared memory, one
absmax per word, and 8 contiguous outputs (16 bytes in half precision) per store."""

import triton
import triton.language as tl

from ._decode import dequantize_codes, element_codes, to_output
from ._registry import Variant, register


@triton.jit
def word_unpack_kernel(
    packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr, out_ptr,
    n, n_rows, n_cols,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, QUANT_TYPE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr, TABLE_IN_REGISTERS: tl.constexpr, WORDS: tl.constexpr,
):
    # Words that lie wholly inside the packed bytes; the < 8 elements after them are the tail.
    full_words = ((n + 1) // 2) // 4
    word = tl.program_id(0).to(tl.int64) * WORDS + tl.arange(0, WORDS)
    word_mask = word < full_words
    # Packed codes and outputs are touched once: stream them past L2 (the absmax tables stay).
    words = tl.load(packed_ptr.to(tl.pointer_type(tl.int32)) + word, mask=word_mask, other=0,
                    eviction_policy="evict_first")
    # Element j of a word: byte j // 2 (little-endian), high nibble first.
    j = tl.arange(0, 8)
    shifts = (j // 2) * 8 + (1 - j % 2) * 4
    codes = (words[:, None] >> shifts[None, :]) & 0xF
    # 8 | BLOCKSIZE, so the 8 elements of a word share one absmax. When a program's words all lie
    # in one nested group (8 * WORDS divides NESTED_BLOCKSIZE * BLOCKSIZE), absmax2 is one scalar.
    GROUP_IS_SCALAR: tl.constexpr = (NESTED_BLOCKSIZE * BLOCKSIZE) % (8 * WORDS) == 0
    group = (tl.program_id(0).to(tl.int64) * (8 * WORDS)) // (NESTED_BLOCKSIZE * BLOCKSIZE)
    values = dequantize_codes(
        codes, (word // (BLOCKSIZE // 8))[:, None], word_mask[:, None], absmax_ptr, code2_ptr, absmax2_ptr,
        offset_ptr, table_ptr, NESTED_BLOCKSIZE, QUANT_TYPE, DOUBLE_QUANT, TABLE_IN_REGISTERS,
        group, GROUP_IS_SCALAR,
    )
    idx = word[:, None] * 8 + j[None, :]
    tl.store(out_ptr + idx, to_output(values, out_ptr), mask=word_mask[:, None], eviction_policy="evict_first")
    if tl.program_id(0) == tl.num_programs(0) - 1:
        tail = full_words * 8 + j.to(tl.int64)
        tail_mask = tail < n
        tail_values = dequantize_codes(
            element_codes(packed_ptr, tail, tail_mask), tail // BLOCKSIZE, tail_mask, absmax_ptr, code2_ptr,
            absmax2_ptr, offset_ptr, table_ptr, NESTED_BLOCKSIZE, QUANT_TYPE, DOUBLE_QUANT, TABLE_IN_REGISTERS,
        )
        tl.store(out_ptr + tail, to_output(tail_values, out_ptr), mask=tail_mask)


def _grid(args, config):
    full_words = ((args.n + 1) // 2) // 4
    return (max(1, triton.cdiv(full_words, config["WORDS"])),)


register(Variant(
    name="word_unpack",
    kernel=word_unpack_kernel,
    grid=_grid,
    space={
        "WORDS": (128, 256, 512, 1024, 2048),
        "TABLE_IN_REGISTERS": (True, False),
        "num_warps": (2, 4, 8),
    },
    default={"WORDS": 512, "TABLE_IN_REGISTERS": False, "num_warps": 4},
    description="32-bit words unpacked by a shift vector into output order, one absmax per word",
))
