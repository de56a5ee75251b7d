"""linear_gemv: a fused 4-bit GEMV for the smallest M (decoding). Each program owns BLOCK_N weight
rows and BLOCK_M rows of x and walks K in BLOCK_K steps of 32-bit packed words. The products are
float32 multiply-adds on the CUDA cores (no tensor core tile to fill at M = 1), and the absmax is
applied once per quantization block to the block's partial sum, not once per element: at M = 1 the
kernel must decode a weight at the memory's pace, and a multiply per element is a quarter of that
budget. The weight is therefore never rounded to 16 bits (the fused family's tolerance, not
dequantize's bits). Needs rows of whole quantization blocks (K % blocksize == 0: every LLM shape)."""

import triton
import triton.language as tl

from ._decode import decode_code, round_to, weight_tile_absmax, weight_tile_codes
from ._registry import Variant, register


@triton.jit
def linear_gemv_kernel(
    x_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr, bias_ptr, out_ptr,
    M, N, K,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, QUANT_TYPE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    HAS_BIAS: tl.constexpr, WEIGHT_DTYPE: tl.constexpr, K_IN_BLOCKS: tl.constexpr,
    TABLE_IN_REGISTERS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    SUB: tl.constexpr = BLOCK_K if BLOCK_K < BLOCKSIZE else BLOCKSIZE
    rows_w = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_x = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    w_mask = rows_w < N
    x_mask = rows_x < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        cols = k_start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows_x.to(tl.int64)[:, None] * K + cols[None, :],
                    mask=x_mask[:, None] & (cols < K)[None, :], other=0.0).to(tl.float32)
        codes = weight_tile_codes(packed_ptr, rows_w, w_mask, k_start, K, BLOCK_K)
        values = decode_code(codes, table_ptr, QUANT_TYPE, TABLE_IN_REGISTERS)  # [BLOCK_N, BLOCK_K]
        partial = tl.sum(tl.reshape(x[:, None, :] * values[None, :, :], (BLOCK_M, BLOCK_N, BLOCK_K // SUB, SUB)), 3)
        absmax = weight_tile_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, rows_w, w_mask, k_start, K,
                                    BLOCK_K, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
        acc += tl.sum(partial * absmax[None, :, :], 2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_w, mask=w_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows_x.to(tl.int64)[:, None] * N + rows_w[None, :]
    tl.store(out, round_to(acc, out_ptr.dtype.element_ty), mask=x_mask[:, None] & w_mask[None, :])


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
        "BLOCK_K": (64, 128, 256, 512),
        "TABLE_IN_REGISTERS": (True, False),
        "num_warps": (2, 4, 8),
        "num_stages": (1, 2, 3),
    },
    default={"BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 256, "TABLE_IN_REGISTERS": False, "num_warps": 4,
             "num_stages": 2},
    description="fused GEMV: float32 multiply-adds on packed words, absmax once per block",
    # Registers: BLOCK_M * BLOCK_N * BLOCK_K products are live at once.
    allowed=lambda config, blocksize: config["BLOCK_M"] * config["BLOCK_N"] * config["BLOCK_K"] <= 16384,
    accepts=_accepts,
))
