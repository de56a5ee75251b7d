"""linear_lut_gemm: a fused 4-bit GEMM for mid-to-large M, one tensor-core product a step.

Each program owns a BLOCK_M x BLOCK_N tile of the output (grouped tile order, Triton's tutorial
03) and walks K in steps of WORDS packed 32-bit words (8 * WORDS columns):

- codes are looked up in registers with PTX ``prmt`` and scaled by their block's absmax in
  packed 16-bit multiplies (``_decode.lut_weights``, as ``linear_lut_tiled`` does: a 16-bit
  weight in x's dtype, within the fused family's tolerance rather than dequantize's bits);
- the 8 elements of every word are joined back into k order in registers (``tl.join`` adds an
  innermost axis held by the same thread), giving the weight tile [BLOCK_N, 8 * WORDS];
- the step is one ``tl.dot`` of x's tile [BLOCK_M, 8 * WORDS] and the weight tile (float32
  accumulation): on Hopper one warpgroup MMA over the whole step, where ``linear_lut_tiled``
  issues eight thin products of K = WORDS each.

The packed weight is read once per M tile and never written dequantized, so a tile of M = 256
decodes each weight once. Needs rows of whole quantization blocks (K % blocksize == 0: every LLM
shape) and a 16-bit x.

Split-K (SPLIT_K > 1), for shapes with too few output tiles to fill the GPU (the down projection,
N = 4096: 32 tiles of 128 columns): program (tile, s) walks the s-th run of the K steps and writes
its float32 sums to plane s of a workspace [SPLIT_K, M, N]; a second kernel adds the planes in
order (and the bias) and casts once, so the result does not depend on which program ends first.

Measured (H200, docs/performance.md sessions 10-11, `bench --linear` S11.2): 14336x4096 at M = 32,
64, 128, 256 in 44.2, 46.4, 57.6, 90.5 µs; the down projection 4096x14336 with split-K in 40.0, 47.4,
55.3, 97.4 µs (bitsandbytes 74.0-126.5, dense bf16 40.9-53.2). The decode and the MMA take turns in
the same warps, so their times add (the MMA's is large from M = 256)."""

import torch
import triton
import triton.language as tl

from ._decode import dot, grouped_tile, lut_step_weights, to_output
from ._format import device_pair_table
from ._launch import KernelArguments, launch
from ._linear import lut_refusal, runtime_arguments
from ._registry import Variant, fits_shared_memory, register


@triton.jit
def _in_k_order(w0, w1, w2, w3, w4, w5, w6, w7):
    """Elements 0..7 of every word [rows, WORDS] as one tile [rows, 8 * WORDS] in k order: column
    8w + j is element j of word w. Each join adds the innermost axis, so j = 4a + 2b + c is built
    from a (first join) to c (last)."""
    b0c0 = tl.join(w0, w4)
    b0c1 = tl.join(w1, w5)
    b1c0 = tl.join(w2, w6)
    b1c1 = tl.join(w3, w7)
    c0 = tl.join(b0c0, b1c0)
    c1 = tl.join(b0c1, b1c1)
    tile = tl.join(c0, c1)  # [rows, WORDS, 2 (a), 2 (b), 2 (c)]
    return tl.reshape(tile, (w0.shape[0], 8 * w0.shape[1]))


@triton.jit
def linear_lut_gemm_kernel(
    x_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr, bias_ptr, out_ptr,
    M, N, K,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, QUANT_TYPE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    HAS_BIAS: tl.constexpr, WEIGHT_DTYPE: tl.constexpr, K_IN_BLOCKS: tl.constexpr, PTX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr, GROUP_M: tl.constexpr, SWAP: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    tile_m, tile_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rows_x = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_w = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    x_mask = rows_x < M
    w_mask = rows_w < N
    words_per_row = tl.multiple_of(K // 8, 4)  # K is a multiple of the blocksize, >= 32
    w_rows = packed_ptr.to(tl.pointer_type(tl.int32)) + rows_w.to(tl.int64)[:, None] * words_per_row
    x_rows = x_ptr + rows_x.to(tl.int64)[:, None] * K
    block_rows = rows_w.to(tl.int64)[:, None] * (K // BLOCKSIZE)
    if SWAP:  # out.T = W @ x.T: the weight tile is the product's M side (small M: no wasted MMA rows)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SPLIT_K == 1:
        first, last = 0, words_per_row
    else:  # this program's run of steps: a multiple of WORDS words (the last run may be short or empty)
        run = tl.cdiv(tl.cdiv(words_per_row, WORDS), SPLIT_K) * WORDS
        first = tl.program_id(1) * run
        last = tl.minimum(first + run, words_per_row)
    for word_start in range(first, last, WORDS):
        w0, w1, w2, w3, w4, w5, w6, w7 = lut_step_weights(
            w_rows, block_rows, w_mask, word_start, words_per_row, K, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr,
            table_ptr, x_ptr.dtype.element_ty, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT, WORDS, PTX)
        cols = word_start * 8 + tl.arange(0, 8 * WORDS)
        x = tl.load(x_rows + cols[None, :], mask=x_mask[:, None] & (cols < K)[None, :], other=0.0)
        w = _in_k_order(w0, w1, w2, w3, w4, w5, w6, w7)
        if SWAP:
            acc = dot(w, tl.trans(x), acc)
        else:
            acc = dot(x, tl.trans(w), acc)
    if SWAP:
        acc = tl.trans(acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_w, mask=w_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows_x.to(tl.int64)[:, None] * N + rows_w[None, :]
    if SPLIT_K > 1:  # out is the float32 workspace [SPLIT_K, M, N]
        out += tl.program_id(1).to(tl.int64) * M * N
    tl.store(out, to_output(acc, out_ptr), mask=x_mask[:, None] & w_mask[None, :])


@triton.jit
def sum_splits_kernel(part_ptr, bias_ptr, out_ptr, M, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK: tl.constexpr):
    """out [M, N] = the SPLIT_K float32 planes of part [SPLIT_K, M, N] added in order (+ bias), cast once."""
    size = tl.cast(M, tl.int64) * N  # tl.cast: Triton passes an M or N of 1 as a constant, not a tensor
    at = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = at < size
    acc = tl.load(part_ptr + at, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(part_ptr + s * size + at, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + at % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + at, to_output(acc, out_ptr), mask=mask)


_SUM_CONFIG = {"BLOCK": 1024, "num_warps": 4}


def _grid(args, config):
    return (triton.cdiv(args.m, config["BLOCK_M"]) * triton.cdiv(args.n, config["BLOCK_N"]), config["SPLIT_K"])


def split_k_run(kernel, grid, name, args, config):
    """Launches a split-K GEMM (``linear_lut_gemm``, ``linear_wgmma``): ``kernel`` itself when
    SPLIT_K == 1, else ``kernel`` writing its float32 partial sums to a workspace [SPLIT_K, M, N]
    (``out_ptr``) and ``sum_splits_kernel`` adding them in order, with the bias, into the output."""
    arguments = args.kernel_arguments()
    split = config["SPLIT_K"]
    if split == 1:  # one launch, under the variant's name (the dispatcher's lean path replays it)
        launch(kernel, lambda c: grid(args, c), arguments, config, args.device, name)
        return
    # A workspace per call: the caching allocator makes it cheap, and it is safe on any stream and
    # inside a CUDA-graph capture. The bias waits for the sum.
    part = torch.empty((split, args.m, args.n), dtype=torch.float32, device=args.device)
    table = device_pair_table(args.weight.quant_type, args.device)
    partial = KernelArguments(runtime_arguments(args.x2d, args.weight, table, None, part, args.m, args.n, args.k),
                              {**arguments.constexprs, "HAS_BIAS": False})
    launch(kernel, lambda c: grid(args, c), partial, config, args.device, f"{name}:split")
    total = KernelArguments([part, args.bias if args.bias is not None else part, args.out, args.m, args.n],
                            {"SPLIT_K": split, "HAS_BIAS": args.bias is not None})
    launch(sum_splits_kernel, lambda c: (triton.cdiv(args.m * args.n, c["BLOCK"]),), total, _SUM_CONFIG, args.device,
           f"{name}:sum")


def _run(args, config):
    split_k_run(linear_lut_gemm_kernel, _grid, "linear_lut_gemm", args, config)


def _accepts(args):
    return lut_refusal(args, "linear_lut_gemm", "multiplies 16-bit weights")


register(Variant(
    name="linear_lut_gemm",
    family="linear",
    kernel=linear_lut_gemm_kernel,
    grid=_grid,
    run=_run,
    space={
        "BLOCK_M": (16, 32, 64, 128, 256),
        "BLOCK_N": (64, 128, 256),
        "WORDS": (8, 16, 32),
        "GROUP_M": (1, 8),
        "SWAP": (False, True),
        "SPLIT_K": (1, 2, 4, 8),
        "num_warps": (4, 8),
        "num_stages": (3, 4),
    },
    default={"BLOCK_M": 128, "BLOCK_N": 128, "WORDS": 8, "GROUP_M": 8, "SWAP": False, "SPLIT_K": 1, "num_warps": 8,
             "num_stages": 3},
    description="fused GEMM: register LUT decode joined into k order, one tl.dot over the whole step, split-K",
    # At most 128 float32 accumulators a thread (more spill to the stack, sm_90).
    allowed=lambda config, blocksize: (config["BLOCK_N"] * config["WORDS"] <= 4096 and fits_shared_memory(config)
                                       and config["BLOCK_M"] * config["BLOCK_N"] <= 4096 * config["num_warps"]),
    accepts=_accepts,
))
