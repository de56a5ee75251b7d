"""linear_gemv: a fused 4-bit GEMV for the smallest M (decoding). Each program owns BLOCK_N weight
rows and BLOCK_M rows of x and walks K in steps of WORDS 32-bit packed words. At M = 1 the kernel must decode a weight
at the memory's pace (58.7 M codes in ~7 µs on an H200), which leaves a few operations per code:
each byte is decoded by one 64-bit load of a (high, low) value pair from a 256-entry table (a tree
of selects costs ~15 operations per code), the products are float32 multiply-adds on the CUDA cores
(no tensor-core tile to fill at M = 1), and the absmax multiplies each word's partial sum once, not
each element. The weight is therefore never rounded to 16 bits (the fused family's tolerance, not
dequantize's bits). Needs rows of whole quantization blocks (K % blocksize == 0: every LLM shape)."""

import triton
import triton.language as tl

from ._decode import byte_pair_values, to_output, weight_words, word_absmax
from ._registry import Variant, register


@triton.jit
def linear_gemv_kernel(
    x_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr, bias_ptr, out_ptr,
    M, N, K,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, QUANT_TYPE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    HAS_BIAS: tl.constexpr, WEIGHT_DTYPE: tl.constexpr, K_IN_BLOCKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr,
):
    rows_w = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_x = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    w_mask = rows_w < N
    x_mask = rows_x < M
    x_rows = x_ptr + rows_x.to(tl.int64)[:, None] * K
    acc = tl.zeros((BLOCK_M, BLOCK_N, WORDS), dtype=tl.float32)
    for k_start in range(0, K, 8 * WORDS):
        words = weight_words(packed_ptr, rows_w, w_mask, k_start, K, WORDS)  # [BLOCK_N, WORDS]
        cols = k_start + tl.arange(0, WORDS) * 8  # first column of each word
        x_word_mask = x_mask[:, None] & (cols < K)[None, :]
        # No reshapes (they cost layout shuffles): element j of every word at once, with x's
        # column j of every word (a strided load of the small, cached x tile).
        partial = tl.zeros((BLOCK_M, BLOCK_N, WORDS), dtype=tl.float32)
        for byte in tl.static_range(4):
            even, odd = byte_pair_values(words, byte, table_ptr)
            x_even = tl.load(x_rows + cols[None, :] + 2 * byte, mask=x_word_mask, other=0.0).to(tl.float32)
            x_odd = tl.load(x_rows + cols[None, :] + 2 * byte + 1, mask=x_word_mask, other=0.0).to(tl.float32)
            partial += x_even[:, None, :] * even[None, :, :] + x_odd[:, None, :] * odd[None, :, :]
        absmax = word_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, rows_w, w_mask, k_start, K, WORDS,
                             BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
        acc += partial * absmax[None, :, :]
    result = tl.sum(acc, 2)
    if HAS_BIAS:
        result += tl.load(bias_ptr + rows_w, mask=w_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows_x.to(tl.int64)[:, None] * N + rows_w[None, :]
    tl.store(out, to_output(result, out_ptr), mask=x_mask[:, None] & w_mask[None, :])


def _grid(args, config):
    return (triton.cdiv(args.n, config["BLOCK_N"]), triton.cdiv(args.m, config["BLOCK_M"]))


def _accepts(args):
    if args.k % args.blocksize:
        return (f"linear_gemv needs K (in_features) to be a multiple of the blocksize; K = {args.k}, "
                f"blocksize {args.blocksize}: use linear_tiled or linear_dequantize")
    return None


register(Variant(
    name="linear_gemv",
    family="linear",
    kernel=linear_gemv_kernel,
    grid=_grid,
    space={
        "BLOCK_M": (1, 2, 4, 8),
        "BLOCK_N": (4, 8, 16, 32, 64),
        "WORDS": (8, 16, 32, 64),
        "num_warps": (2, 4, 8),
        "num_stages": (1, 2, 3),
    },
    default={"BLOCK_M": 1, "BLOCK_N": 16, "WORDS": 32, "num_warps": 4, "num_stages": 2},
    description="fused GEMV: byte-pair table decode, float32 multiply-adds, absmax once per word",
    # Registers: two [BLOCK_M, BLOCK_N, WORDS] float32 accumulators are live at once.
    allowed=lambda config, blocksize: config["BLOCK_M"] * config["BLOCK_N"] * config["WORDS"] <= 2048,
    accepts=_accepts,
))
