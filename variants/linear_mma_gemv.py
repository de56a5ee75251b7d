"""linear_mma_gemv: a fused 4-bit GEMV/skinny GEMM on the tensor cores, weights straight from the
register lookup into ``mma.sync`` fragments (no shared memory, no layout conversion).

``out.T = W @ x.T``: 16 weight rows are the m16n8k16 instruction's M side and up to 8 rows of x its
N side, so one decoded weight fragment serves every x row of an 8-row tile. A thread's operands
come straight from whole packed words, because the sum over k does not care about the order of k:

- lane (g, t) = (lane // 4, lane % 4) holds, per 32 columns of k, the logical A columns
  {2t, 2t+1, 2t+8, 2t+9} of two consecutive k16 instructions for rows g and g + 8. It takes
  them from one packed word of each row (8 consecutive codes), and reads x's same 8 columns
  of x row g as one 16-byte piece: the B fragment, permuted the same way;
- a thread's CH words are consecutive (one vector load a row, CH <= blocksize / 8, so they share
  one quantization block and one absmax);
- codes are looked up with PTX ``prmt`` (``_decode``'s byte planes), paired into 16-bit x2 words
  in x's dtype and scaled by the word's absmax in one packed multiply (the fused family's
  tolerance: the weight is rounded once to x's dtype, as ``linear_lut_tiled`` does); a float16 x
  on a bfloat16 weight looks them up in a table of the block's exact weights instead (EXACT);
- two ``mma.sync.m16n8k16`` per word pair, float32 accumulation; the next step's words, absmax
  and x are loaded before this step is decoded.

Needs rows of whole quantization blocks (K % blocksize == 0), a 16-bit x and an NVIDIA GPU of
compute capability 8.0 or newer (Gluon, inline PTX): no interpreter, no AMD.
"""

import triton
import triton.language as tl

from ._decode import _LUT_HALF, _LUT_NEXT_HALF, _LUT_OFFSET, _LUT_SELECT, _LUT_STRIDE, block_planes
from ._linear import lut_refusal
from ._registry import Variant, VariantUnavailable, register

try:  # Gluon as this file uses it ships with Triton 3.6
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 6):
        raise ImportError(f"Triton {triton.__version__} is older than 3.6")
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
except ImportError as exc:
    raise VariantUnavailable(f"linear_mma_gemv needs Triton 3.6 or newer with Gluon: {exc}") from exc


def _word_pairs(word: str, scale: str | None, out: tuple, first_plane: int = 12) -> str:
    """asm: the 8 codes of ``word`` as four 16-bit x2 words (elements 0-1, 2-3, 4-5, 6-7, the even
    element in the low half), times ``scale`` (a 16-bit x2 word) rounded once; the table's own
    entries where ``scale`` is None. Byte planes in operands ``first_plane`` to ``first_plane`` + 7."""
    planes = dict(zip(("l0", "l1", "l2", "l3", "h0", "h1", "h2", "h3"), (f"${first_plane + i}" for i in range(8))))
    half = _LUT_HALF.format(**planes)  # lo, hi: bytes of elements 1, 0, 3, 2 of a half-word
    pairs = "prmt.b32 {0}, lo, hi, 0x4051;\nfma.rn.T {0}, {0}, {2}, nz;\nprmt.b32 {1}, lo, hi, 0x6273;\nfma.rn.T {1}, {1}, {2}, nz;\n"
    if scale is None:
        pairs = "prmt.b32 {0}, lo, hi, 0x4051;\nprmt.b32 {1}, lo, hi, 0x6273;\n"
    return (_LUT_SELECT.replace("$8", word) + half + pairs.format(out[0], out[1], scale) + _LUT_NEXT_HALF
            + half + pairs.format(out[2], out[3], scale))


def _decode_asm(dtype: str) -> str:
    """Two words (rows g and g + 8: $8, $9) with their float32 absmax ($10, $11) to the A operands
    of two m16n8k16 instructions ($0-$3 and $4-$7)."""
    body = ("{\n.reg .b32 s, t, a, b, lo, hi, nz, s0, s1;\nmov.b32 nz, 0x80008000;\n"
            "cvt.rn.T.f32 s0, $10, $10;\ncvt.rn.T.f32 s1, $11, $11;\n"
            + _word_pairs("$8", "s0", ("$0", "$2", "$4", "$6"))
            + _word_pairs("$9", "s1", ("$1", "$3", "$5", "$7")) + "}")
    return body.replace(".T", f".{dtype}x2")


def _mma_asm(dtype: str) -> str:
    """acc ($0-$3, tied to $4-$7) += A ($8-$15: two instructions' operands) @ B ($16-$19)."""
    mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{dtype}.{dtype}.f32"
    return (f"{mma} {{$0, $1, $2, $3}}, {{$8, $9, $10, $11}}, {{$16, $17}}, {{$0, $1, $2, $3}};\n"
            f"{mma} {{$0, $1, $2, $3}}, {{$12, $13, $14, $15}}, {{$18, $19}}, {{$0, $1, $2, $3}};")


_DECODE_BF16, _DECODE_F16 = tl.constexpr(_decode_asm("bf16")), tl.constexpr(_decode_asm("f16"))
# Two words (rows g and g + 8: $8, $9) looked up in tables of their blocks' weights (rows g: planes
# $10-$17, g + 8: $18-$25; ``_decode.block_planes``) to the A operands $0-$7.
_DECODE_BLOCK_TABLES = tl.constexpr("{\n.reg .b32 s, t, a, b, lo, hi;\n"
                                    + _word_pairs("$8", None, ("$0", "$2", "$4", "$6"), first_plane=10)
                                    + _word_pairs("$9", None, ("$1", "$3", "$5", "$7"), first_plane=18) + "}")
_MMA_BF16, _MMA_F16 = tl.constexpr(_mma_asm("bf16")), tl.constexpr(_mma_asm("f16"))


@gluon.constexpr_function
def _axis(layout, dim, rank):
    """The 1-D layout of axis ``dim`` of a rank-``rank`` layout (every other axis sliced away)."""
    for other in reversed(range(rank)):
        if other != dim:
            layout = gl.SliceLayout(other, layout)
    return layout


@gluon.jit
def _block_table(absmax, QUANT_TYPE: gl.constexpr, F16: gl.constexpr):
    """The eight byte planes of each block's own weights (``_decode.block_planes``: dequantize's
    bfloat16 values, as float16 where F16) from its float32 ``absmax``, one table a thread and block."""
    return gl.inline_asm_elementwise(block_planes(QUANT_TYPE, F16), "=r,=r,=r,=r,=r,=r,=r,=r,f", [absmax],
                                     dtype=(gl.int32,) * 8, is_pure=True, pack=1)


@gluon.jit
def _absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, block, mask, NESTED_BLOCKSIZE: gl.constexpr,
            DOUBLE_QUANT: gl.constexpr):
    """float32 absmax of quantization blocks ``block`` (decoding double quant)."""
    if DOUBLE_QUANT:
        q = gl.load(absmax_ptr + block, mask=mask, other=0).to(gl.int32)
        absmax = gl.load(code2_ptr + q) * gl.load(absmax2_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        absmax = absmax + offset
    else:
        absmax = gl.load(absmax_ptr + block, mask=mask, other=0.0)
    return absmax


@gluon.jit
def _step(words_ptr, x_ptr, word0, word1, w_mask0, w_mask1, w_col, x_at, x_col, x_mask, step, words_per_row, K,
          STEP_WORDS: gl.constexpr):
    """One step's packed words (rows g and g + 8) and x pieces, zero past the row's end."""
    first = step * STEP_WORDS
    in_k = first + w_col < words_per_row
    w0 = gl.load(words_ptr + word0 + first, mask=w_mask0 & in_k, other=0)
    w1 = gl.load(words_ptr + word1 + first, mask=w_mask1 & in_k, other=0)
    x = gl.load(x_ptr + x_at + first * 4, mask=x_mask & (first * 4 + x_col < K // 2), other=0)
    return w0, w1, x


@gluon.jit
def linear_mma_gemv_kernel(
    x_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr, bias_ptr, out_ptr,
    M, N, K,
    BLOCKSIZE: gl.constexpr, NESTED_BLOCKSIZE: gl.constexpr, QUANT_TYPE: gl.constexpr, DOUBLE_QUANT: gl.constexpr,
    HAS_BIAS: gl.constexpr, WEIGHT_DTYPE: gl.constexpr, K_IN_BLOCKS: gl.constexpr, PTX: gl.constexpr,
    TILES: gl.constexpr, CH: gl.constexpr, MT: gl.constexpr, KS: gl.constexpr,
):
    WN: gl.constexpr = gl.num_warps() // KS  # warps along the rows; KS warps split each row's words
    RW: gl.constexpr = TILES * WN  # 16-row weight tiles of a program
    WORDS: gl.constexpr = 4 * CH  # packed words a row, warp and step
    # [MT, RW, KS, 8, CH, 4] = (x tile, weight tile, k split, g, word of the thread, t): lane =
    # 4g + t, the CH words of a thread innermost (consecutive in memory); warp = ks + KS * tile.
    L: gl.constexpr = gl.BlockedLayout([MT, TILES, 1, 1, CH, 1], [1, 1, 1, 8, 1, 4], [1, WN, KS, 1, 1, 1],
                                       [4, 5, 3, 2, 1, 0])
    row0 = gl.program_id(0) * (RW * 16)
    m0 = gl.program_id(1) * (MT * 8)
    words_per_row = gl.multiple_of(K // 8, 4)  # K is a multiple of the blocksize, >= 32

    tile = gl.arange(0, RW, layout=_axis(L, 1, 6))[None, :, None, None, None, None]
    ks = gl.arange(0, KS, layout=_axis(L, 2, 6))[None, None, :, None, None, None]
    g = gl.arange(0, 8, layout=_axis(L, 3, 6))[None, None, None, :, None, None]
    c = gl.arange(0, CH, layout=_axis(L, 4, 6))[None, None, None, None, :, None]
    t = gl.arange(0, 4, layout=_axis(L, 5, 6))[None, None, None, None, None, :]
    row_a = row0 + tile * 16 + g  # rows g; rows g + 8 are row_a + 8
    w_col = ks * WORDS + t * CH + c  # the word of the step
    word0 = row_a.to(gl.int64) * words_per_row + w_col
    word1 = word0 + 8 * words_per_row
    w_mask0 = row_a < N
    w_mask1 = row_a + 8 < N
    # The absmax of a thread's words: one block (CH words of 8 codes, CH * 8 <= BLOCKSIZE).
    t_codes = (ks * WORDS + t * CH) * 8  # the thread's first code in the step
    row_block0 = row_a.to(gl.int64) * (K // BLOCKSIZE)
    row_block1 = row_block0 + 8 * (K // BLOCKSIZE)

    # x pieces [MT, KS, 8, CH, 4, 4]: row m0 + 8 mt + g, 32-bit pair i of the word's 8 columns (a
    # thread holds its CH words' pieces, 16 * CH contiguous bytes; the WN warps of a k split hold copies).
    LX: gl.constexpr = gl.BlockedLayout([MT, 1, 1, CH, 1, 4], [1, 1, 8, 1, 4, 1], [WN, KS, 1, 1, 1, 1],
                                        [5, 3, 4, 2, 1, 0])
    x_row = (m0 + gl.arange(0, MT, layout=_axis(LX, 0, 6))[:, None, None, None, None, None] * 8
             + gl.arange(0, 8, layout=_axis(LX, 2, 6))[None, None, :, None, None, None])
    x_word = (gl.arange(0, KS, layout=_axis(LX, 1, 6))[None, :, None, None, None, None] * WORDS
              + gl.arange(0, 4, layout=_axis(LX, 4, 6))[None, None, None, None, :, None] * CH
              + gl.arange(0, CH, layout=_axis(LX, 3, 6))[None, None, None, :, None, None])
    x_col = x_word * 4 + gl.arange(0, 4, layout=_axis(LX, 5, 6))[None, None, None, None, None, :]  # 32-bit pairs
    x_at = x_row.to(gl.int64) * (K // 2) + x_col
    x_mask = x_row < M

    # The LUT's byte planes (``_format.LUT_KINDS``: 1 = float16, 2 = bfloat16). prmt takes them from
    # ordinary registers: loaded at a lane-dependent offset (always 0, as K < 2^31), they stay in
    # eight registers, where uniform values would be moved in before every use.
    F16: gl.constexpr = x_ptr.dtype.element_ty == gl.float16
    # A float16 x on a bfloat16 weight (state.dtype): the contract's weight is dequantize's bfloat16
    # value (then float16), which x's float16 grid times the absmax misses by up to half a bfloat16
    # ulp. EXACT builds a table of each block's weights from its absmax (``_decode.block_planes``,
    # ~4.5 instructions an entry, once per CH words) and looks the weights up in it, with no multiply.
    EXACT: gl.constexpr = F16 and WEIGHT_DTYPE == gl.bfloat16
    KIND: gl.constexpr = 1 if F16 else 2
    DECODE: gl.constexpr = _DECODE_F16 if F16 else _DECODE_BF16
    MMA: gl.constexpr = _MMA_F16 if F16 else _MMA_BF16
    lane = gl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [gl.full([1, 1, 1, 1, 1, 1], 0, gl.int32, L)],
                                     dtype=gl.int32, is_pure=True, pack=1)
    planes = table_ptr.to(gl.pointer_type(gl.int32)) + _LUT_OFFSET + KIND * _LUT_STRIDE + (lane & (K >> 31))
    l0, l1, l2, l3 = gl.load(planes), gl.load(planes + 1), gl.load(planes + 2), gl.load(planes + 3)
    h0, h1, h2, h3 = gl.load(planes + 4), gl.load(planes + 5), gl.load(planes + 6), gl.load(planes + 7)
    offset = 0.0
    if DOUBLE_QUANT:
        offset = gl.load(offset_ptr)

    words_ptr = packed_ptr.to(gl.pointer_type(gl.int32))
    pairs_ptr = x_ptr.to(gl.pointer_type(gl.int32))
    acc0 = gl.zeros([MT, RW, KS, 8, CH, 4], gl.float32, L)
    acc1 = gl.zeros([MT, RW, KS, 8, CH, 4], gl.float32, L)
    acc2 = gl.zeros([MT, RW, KS, 8, CH, 4], gl.float32, L)
    acc3 = gl.zeros([MT, RW, KS, 8, CH, 4], gl.float32, L)
    w0, w1, x = _step(words_ptr, pairs_ptr, word0, word1, w_mask0, w_mask1, w_col, x_at, x_col, x_mask, 0,
                      words_per_row, K, KS * WORDS)
    for step in range(gl.cdiv(words_per_row, KS * WORDS)):
        next_w0, next_w1, next_x = _step(words_ptr, pairs_ptr, word0, word1, w_mask0, w_mask1, w_col, x_at, x_col,
                                         x_mask, step + 1, words_per_row, K, KS * WORDS)
        code = step * (KS * WORDS * 8) + t_codes
        block = code // BLOCKSIZE
        s0 = _absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, row_block0 + block, w_mask0 & (code < K),
                     NESTED_BLOCKSIZE, DOUBLE_QUANT)
        s1 = _absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, row_block1 + block, w_mask1 & (code < K),
                     NESTED_BLOCKSIZE, DOUBLE_QUANT)
        if EXACT:
            u0, u1, u2, u3, u4, u5, u6, u7 = _block_table(s0, QUANT_TYPE, True)
            v0, v1, v2, v3, v4, v5, v6, v7 = _block_table(s1, QUANT_TYPE, True)
            a0, a1, a2, a3, a4, a5, a6, a7 = gl.inline_asm_elementwise(
                _DECODE_BLOCK_TABLES, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
                [w0, w1, u0, u1, u2, u3, u4, u5, u6, u7, v0, v1, v2, v3, v4, v5, v6, v7], dtype=(gl.int32,) * 8,
                is_pure=True, pack=1)
        else:
            a0, a1, a2, a3, a4, a5, a6, a7 = gl.inline_asm_elementwise(
                DECODE, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,f,f,r,r,r,r,r,r,r,r",
                [w0, w1, s0, s1, l0, l1, l2, l3, h0, h1, h2, h3], dtype=(gl.int32,) * 8, is_pure=True, pack=1)
        # x's 32-bit pair i of each word: split the last axis (i = 2a + b) on b, then a.
        x_even, x_odd = gl.split(gl.reshape(x, [MT, KS, 8, CH, 4, 2, 2]))
        b0, b2 = gl.split(x_even)
        b1, b3 = gl.split(x_odd)
        acc0, acc1, acc2, acc3 = gl.inline_asm_elementwise(
            MMA, "=f,=f,=f,=f,0,1,2,3,r,r,r,r,r,r,r,r,r,r,r,r",
            [acc0, acc1, acc2, acc3, a0, a1, a2, a3, a4, a5, a6, a7,
             _fragment(b0, L), _fragment(b1, L), _fragment(b2, L), _fragment(b3, L)],
            dtype=(gl.float32,) * 4, is_pure=True, pack=1)
        w0, w1, x = next_w0, next_w1, next_x

    # acc0..3 = D[g][2t], D[g][2t + 1], D[g + 8][2t], D[g + 8][2t + 1] of each 16 x 8 tile, summed
    # over the thread's words, then over the k splits (across warps).
    LO: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(4, L))
    row_o = row0 + (gl.arange(0, RW, layout=_axis(LO, 1, 4))[None, :, None, None] * 16
                    + gl.arange(0, 8, layout=_axis(LO, 2, 4))[None, None, :, None])
    m_o = (m0 + gl.arange(0, MT, layout=_axis(LO, 0, 4))[:, None, None, None] * 8
           + gl.arange(0, 4, layout=_axis(LO, 3, 4))[None, None, None, :] * 2)
    _store(out_ptr, bias_ptr, gl.sum(gl.sum(acc0, axis=4), axis=2), row_o, m_o, M, N, HAS_BIAS)
    _store(out_ptr, bias_ptr, gl.sum(gl.sum(acc1, axis=4), axis=2), row_o, m_o + 1, M, N, HAS_BIAS)
    _store(out_ptr, bias_ptr, gl.sum(gl.sum(acc2, axis=4), axis=2), row_o + 8, m_o, M, N, HAS_BIAS)
    _store(out_ptr, bias_ptr, gl.sum(gl.sum(acc3, axis=4), axis=2), row_o + 8, m_o + 1, M, N, HAS_BIAS)


@gluon.jit
def _fragment(piece, layout: gl.constexpr):
    """A B-operand register of x [MT, KS, 8, CH, 4] as [MT, 1, KS, 8, CH, 4] in the accumulators' layout
    (the split already put it there: the conversion moves nothing)."""
    return gl.convert_layout(piece, gl.SliceLayout(1, layout), assert_trivial=True)[:, None]


@gluon.jit
def _store(out_ptr, bias_ptr, values, rows, ms, M, N, HAS_BIAS: gl.constexpr):
    mask = (rows < N) & (ms < M)
    if HAS_BIAS:
        values += gl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(gl.float32)
    gl.store(out_ptr + ms.to(gl.int64) * N + rows, values.to(out_ptr.dtype.element_ty), mask=mask)


def _grid(args, config):
    rows = 16 * config["TILES"] * (config["num_warps"] // config["KS"])
    return (triton.cdiv(args.n, rows), triton.cdiv(args.m, 8 * config["MT"]))


def _accepts(args):
    if args.x2d.data_ptr() % 4:  # x is read as 32-bit pairs (a misaligned load is a sticky CUDA error)
        return ("linear_mma_gemv reads x as pairs of 16-bit values and x's data does not start on a 4-byte "
                "boundary: pass a contiguous x of its own (x.clone()) or another variant")
    return lut_refusal(args, "linear_mma_gemv", "multiplies 16-bit weights", block_tables=True)


register(Variant(
    name="linear_mma_gemv",
    family="linear",
    kernel=linear_mma_gemv_kernel,
    grid=_grid,
    space={
        "TILES": (1, 2),
        "CH": (2, 4),
        "MT": (1, 2, 4, 8),
        "KS": (2, 4, 8),
        "num_warps": (4, 8),
        "num_stages": (1,),
    },
    default={"TILES": 1, "CH": 4, "MT": 1, "KS": 4, "num_warps": 4, "num_stages": 1},
    description="tensor-core GEMV: register LUT decode straight into mma.sync fragments, k permuted per word",
    # A thread's CH words share one absmax block. A thread holds 4 accumulators and 4 registers of x
    # per unit of MT x CH x TILES: past 16 units ptxas spills to the stack (sm_90), so those configs
    # are left out of the space.
    allowed=lambda config, blocksize: (8 * config["CH"] <= blocksize and config["num_warps"] % config["KS"] == 0
                                       and config["MT"] * config["CH"] * config["TILES"] <= 16),
    min_capability=(8, 0),
    accepts=_accepts,
))
