"""linear_gemv: a fused 4-bit GEMV for the smallest M (decoding). Each program owns BLOCK_N weight
rows and BLOCK_M rows of x and walks K in steps of WORDS packed 32-bit words. At M = 1 the kernel
must decode the weight at the memory's pace (58.7 M codes in ~7 µs on an H200), which leaves
about four instructions per code (half of them int32, which runs at half the float32 rate):

- codes are looked up in registers with PTX ``prmt`` (``_decode.lut_values``: ~3 int32
  operations a code, against 15 for a tree of selects or a gather per byte from L1);
- the products are float32 multiply-adds on the CUDA cores (no tensor-core tile to fill at M = 1)
  with the codes on x's 16-bit grid (the fused family's tolerance, not dequantize's bits);
- a word holds 8 codes of one quantization block, so partial sums are summed per block and the
  absmax multiplies once per block, not once per code.

Needs rows of whole quantization blocks (K % blocksize == 0: every LLM shape) and a 16-bit x."""

import triton
import triton.language as tl

from ._decode import lut_values, step_absmax, to_output, word_columns
from ._linear import lut_refusal
from ._registry import Variant, register


@triton.jit
def linear_gemv_kernel(
    x_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr, bias_ptr, out_ptr,
    M, N, K,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, QUANT_TYPE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    HAS_BIAS: tl.constexpr, WEIGHT_DTYPE: tl.constexpr, K_IN_BLOCKS: tl.constexpr, PTX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr,
):
    # A step's WORDS words per row hold BLOCKS quantization blocks of PER_BLOCK words (one block of
    # PER_BLOCK = WORDS words where a block is longer than a step).
    PER_BLOCK: tl.constexpr = min(BLOCKSIZE // 8, WORDS)
    BLOCKS: tl.constexpr = WORDS // PER_BLOCK
    rows_w = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_x = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    w_mask = rows_w < N
    x_mask = rows_x < M
    words_per_row = tl.multiple_of(K // 8, 4)  # K is a multiple of the blocksize, >= 32
    w_rows = packed_ptr.to(tl.pointer_type(tl.int32)) + rows_w.to(tl.int64)[:, None] * words_per_row
    x_rows = x_ptr + rows_x.to(tl.int64)[:, None, None] * K
    block_rows = rows_w.to(tl.int64)[:, None] * (K // BLOCKSIZE)
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCKS), dtype=tl.float32)
    for word_start in range(0, words_per_row, WORDS):
        col_words = word_start + tl.arange(0, WORDS)
        in_k = col_words < words_per_row
        words = tl.load(w_rows + col_words[None, :], mask=w_mask[:, None] & in_k[None, :], other=0)
        e0, e1, e2, e3, e4, e5, e6, e7 = lut_values(words, table_ptr, x_ptr.dtype.element_ty, PTX)
        x0, x1, x2, x3, x4, x5, x6, x7 = word_columns(x_rows, col_words, x_mask[:, None, None] & in_k[None, :, None],
                                                      tl.float32)
        part = x0[:, None, :] * e0[None, :, :]
        part = tl.fma(x1[:, None, :], e1[None, :, :], part)
        part = tl.fma(x2[:, None, :], e2[None, :, :], part)
        part = tl.fma(x3[:, None, :], e3[None, :, :], part)
        part = tl.fma(x4[:, None, :], e4[None, :, :], part)
        part = tl.fma(x5[:, None, :], e5[None, :, :], part)
        part = tl.fma(x6[:, None, :], e6[None, :, :], part)
        part = tl.fma(x7[:, None, :], e7[None, :, :], part)
        absmax = step_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, block_rows, w_mask, word_start, K,
                             BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT, BLOCKS, PER_BLOCK)
        acc += tl.sum(tl.reshape(part, (BLOCK_M, BLOCK_N, BLOCKS, PER_BLOCK)), 3) * absmax[None, :, :]
    result = tl.sum(acc, 2)
    if HAS_BIAS:
        result += tl.load(bias_ptr + rows_w, mask=w_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows_x.to(tl.int64)[:, None] * N + rows_w[None, :]
    tl.store(out, to_output(result, out_ptr), mask=x_mask[:, None] & w_mask[None, :])


def _grid(args, config):
    return (triton.cdiv(args.n, config["BLOCK_N"]), triton.cdiv(args.m, config["BLOCK_M"]))


def _accepts(args):
    return lut_refusal(args, "linear_gemv", "decodes codes on a 16-bit grid")


register(Variant(
    name="linear_gemv",
    family="linear",
    kernel=linear_gemv_kernel,
    grid=_grid,
    space={
        "BLOCK_M": (1, 2, 4, 8),
        "BLOCK_N": (2, 4, 8, 16),
        "WORDS": (64, 128, 256, 512),
        "num_warps": (2, 4, 8),
        "num_stages": (1,),
    },
    default={"BLOCK_M": 1, "BLOCK_N": 4, "WORDS": 256, "num_warps": 8, "num_stages": 1},
    description="fused GEMV: register LUT decode (PTX prmt), float32 multiply-adds, absmax once per block",
    # Registers: the [BLOCK_M, BLOCK_N, WORDS] float32 partial sums are live with the decoded codes.
    allowed=lambda config, blocksize: config["BLOCK_M"] * config["BLOCK_N"] * config["WORDS"] <= 4096,
    accepts=_accepts,
))
