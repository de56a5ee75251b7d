"""linear_tiled: a fused 4-bit GEMM. Each program owns a BLOCK_M x BLOCK_N tile of the output and
walks K in steps of WORDS packed 32-bit words (8 * WORDS columns): it decodes the weight tile in
registers, a byte (two codes) per 64-bit load of a value-pair table, bit-identical to dequantize in
the state's dtype, casts it to x's dtype and multiplies on the tensor cores (``tl.dot``, float32
accumulation). The packed weight is read once per M tile and never written dequantized. Program
order groups GROUP_M tiles along M so that neighbouring programs share weight tiles in L2
(Triton's tutorial 03)."""

import triton
import triton.language as tl

from ._decode import byte_pair_values, dot, grouped_tile, round_to, to_output, weight_tile, weight_words, word_absmax
from ._registry import Variant, fits_shared_memory, register


@triton.jit
def linear_tiled_kernel(
    x_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr, bias_ptr, out_ptr,
    M, N, K,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, QUANT_TYPE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    HAS_BIAS: tl.constexpr, WEIGHT_DTYPE: tl.constexpr, K_IN_BLOCKS: tl.constexpr, PTX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr, GROUP_M: tl.constexpr,
):
    tile_m, tile_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rows_x = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_w = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    x_mask = rows_x < M
    w_mask = rows_w < N
    x_dtype = x_ptr.dtype.element_ty
    x_rows = x_ptr + rows_x.to(tl.int64)[:, None] * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, 8 * WORDS):
        if K_IN_BLOCKS:
            # No reshapes (they cost layout shuffles): the tile is multiplied as 8 slices, element
            # j of every packed word against x's column j of every word; the sum is the same.
            words = weight_words(packed_ptr, rows_w, w_mask, k_start, K, WORDS)
            absmax = word_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, rows_w, w_mask, k_start, K, WORDS,
                                 BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
            cols = k_start + tl.arange(0, WORDS) * 8
            x_word_mask = x_mask[:, None] & (cols < K)[None, :]
            for byte in tl.static_range(4):
                even, odd = byte_pair_values(words, byte, table_ptr)
                x_even = tl.load(x_rows + cols[None, :] + 2 * byte, mask=x_word_mask, other=0.0)
                x_odd = tl.load(x_rows + cols[None, :] + 2 * byte + 1, mask=x_word_mask, other=0.0)
                # The weight exactly as dequantize writes it, then in x's dtype.
                w_even = round_to(even * absmax, WEIGHT_DTYPE).to(x_dtype)
                w_odd = round_to(odd * absmax, WEIGHT_DTYPE).to(x_dtype)
                acc = dot(x_even, tl.trans(w_even), acc)
                acc = dot(x_odd, tl.trans(w_odd), acc)
        else:
            cols = k_start + tl.arange(0, 8 * WORDS)
            x = tl.load(x_rows + cols[None, :], mask=x_mask[:, None] & (cols < K)[None, :], other=0.0)
            w = weight_tile(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr, rows_w, w_mask,
                            k_start, K, 8 * WORDS, BLOCKSIZE, NESTED_BLOCKSIZE, QUANT_TYPE, DOUBLE_QUANT, WEIGHT_DTYPE)
            acc = dot(x, tl.trans(w.to(x_dtype)), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_w, mask=w_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows_x.to(tl.int64)[:, None] * N + rows_w[None, :]
    tl.store(out, to_output(acc, out_ptr), mask=x_mask[:, None] & w_mask[None, :])


def _grid(args, config):
    return (triton.cdiv(args.m, config["BLOCK_M"]) * triton.cdiv(args.n, config["BLOCK_N"]),)


register(Variant(
    name="linear_tiled",
    family="linear",
    kernel=linear_tiled_kernel,
    grid=_grid,
    space={
        "BLOCK_M": (16, 32, 64, 128),
        "BLOCK_N": (32, 64, 128, 256),
        "WORDS": (16, 32),
        "GROUP_M": (1, 8),
        "num_warps": (4, 8),
        "num_stages": (2, 3, 4),
    },
    default={"BLOCK_M": 64, "BLOCK_N": 128, "WORDS": 16, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
    description="fused GEMM: weight tile decoded in registers, tl.dot in float32, grouped tile order",
    allowed=lambda config, blocksize: fits_shared_memory(config),
))
