"""linear_lut_tiled: a fused 4-bit GEMM on the tensor cores for small-to-mid M. Each program owns a
BLOCK_M x BLOCK_N tile of the output and walks K in steps of WORDS packed 32-bit words:

- codes are looked up in registers with PTX ``prmt`` and scaled by their block's absmax in
  packed 16-bit multiplies (``_decode.lut_weights``: a 16-bit weight in x's dtype, within the
  fused family's tolerance rather than dequantize's bits);
- the step is multiplied as 8 slices, element j of every word against x's column j of every
  word (``tl.dot``, float32 accumulation): the same sum, with no reshape of the weight tile.

The packed weight is read once per M tile and never written dequantized. Needs rows of whole
quantization blocks (K % blocksize == 0: every LLM shape) and a 16-bit x."""

import triton
import triton.language as tl

from ._decode import dot, lut_step_weights, to_output, word_columns
from ._linear import lut_refusal
from ._registry import Variant, fits_shared_memory, register


@triton.jit
def linear_lut_tiled_kernel(
    x_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr, bias_ptr, out_ptr,
    M, N, K,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, QUANT_TYPE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    HAS_BIAS: tl.constexpr, WEIGHT_DTYPE: tl.constexpr, K_IN_BLOCKS: tl.constexpr, PTX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr,
):
    rows_w = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_x = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    w_mask = rows_w < N
    x_mask = rows_x < M
    x_dtype = x_ptr.dtype.element_ty
    words_per_row = tl.multiple_of(K // 8, 4)  # K is a multiple of the blocksize, >= 32
    w_rows = packed_ptr.to(tl.pointer_type(tl.int32)) + rows_w.to(tl.int64)[:, None] * words_per_row
    x_rows = x_ptr + rows_x.to(tl.int64)[:, None, None] * K
    block_rows = rows_w.to(tl.int64)[:, None] * (K // BLOCKSIZE)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for word_start in range(0, words_per_row, WORDS):
        col_words = word_start + tl.arange(0, WORDS)
        in_k = col_words < words_per_row
        w0, w1, w2, w3, w4, w5, w6, w7 = lut_step_weights(
            w_rows, block_rows, w_mask, word_start, words_per_row, K, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr,
            table_ptr, x_dtype, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT, WORDS, PTX)
        x0, x1, x2, x3, x4, x5, x6, x7 = word_columns(x_rows, col_words, x_mask[:, None, None] & in_k[None, :, None],
                                                      x_dtype)
        acc = dot(x0, tl.trans(w0), acc)
        acc = dot(x1, tl.trans(w1), acc)
        acc = dot(x2, tl.trans(w2), acc)
        acc = dot(x3, tl.trans(w3), acc)
        acc = dot(x4, tl.trans(w4), acc)
        acc = dot(x5, tl.trans(w5), acc)
        acc = dot(x6, tl.trans(w6), acc)
        acc = dot(x7, tl.trans(w7), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_w, mask=w_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows_x.to(tl.int64)[:, None] * N + rows_w[None, :]
    tl.store(out, to_output(acc, out_ptr), mask=x_mask[:, None] & w_mask[None, :])


def _grid(args, config):
    return (triton.cdiv(args.n, config["BLOCK_N"]), triton.cdiv(args.m, config["BLOCK_M"]))


def _accepts(args):
    return lut_refusal(args, "linear_lut_tiled", "multiplies 16-bit weights")


register(Variant(
    name="linear_lut_tiled",
    family="linear",
    kernel=linear_lut_tiled_kernel,
    grid=_grid,
    space={
        "BLOCK_M": (16, 32, 64, 128),
        "BLOCK_N": (32, 64, 128),
        "WORDS": (16, 32, 64),
        "num_warps": (4, 8),
        "num_stages": (1, 3),
    },
    default={"BLOCK_M": 16, "BLOCK_N": 64, "WORDS": 32, "num_warps": 4, "num_stages": 1},
    description="fused GEMM: register LUT decode (PTX prmt) into 16-bit weights, 8 tl.dot slices per step",
    allowed=lambda config, blocksize: (config["BLOCK_N"] * config["WORDS"] <= 4096
                                       and config["BLOCK_M"] * config["WORDS"] <= 4096
                                       and fits_shared_memory(config)),
    accepts=_accepts,
))
