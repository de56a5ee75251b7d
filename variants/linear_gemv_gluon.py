"""linear_gemv_gluon: the fused 4-bit GEMV of linear_gemv with every register layout explicit.

linear_gemv decodes with the register LUT (PTX ``prmt``) at ~3 int32 operations a code, yet ran at
~14 instructions a code: plain Triton gives x's columns and the packed words different register
layouts and exchanges them through shared memory 8 times a step (docs/performance.md, session 6).
Here (Gluon, Triton's explicit-layout dialect) one 4-D layout ``[BLOCK_M, BLOCK_N, QUADS, 4]``
places everything a thread touches:

- a thread owns ROWS weight rows x 4 consecutive packed words (one 16-byte load per row) and the
  x columns of those same 4 words for all BLOCK_M rows of x (four 16-byte loads per x row), so the
  decoded codes meet their x values in registers, with no exchange;
- the 32 lanes of a warp walk 128 consecutive words (512 contiguous bytes per row); warps split
  the rows (WARPS_N) and the words of a step (the rest); the one cross-lane sum is at the end;
- the 4 words of a thread lie in one quantization block (blocksize >= 32), so the absmax is
  loaded once per 32 codes and multiplies their float32 sum once per x row;
- the packed words stream through a ring of STAGES steps in shared memory (cp.async), the next
  step's absmax and x are loaded into registers before this step is decoded;
- the bfloat16 lookup pairs two codes per prmt and widens them by a shift and a mask.

Measured (H200, docs/performance.md session 8): 25.6 µs at M = 1 on 14336x4096 and 4096x14336,
against 34 µs for bitsandbytes' kernel, a 7.3 µs floor and 14.3 µs for a kernel that only reads the
bytes. Nsight Compute (session 9) saw 1.0 TB/s and stalls on global loads, yet more bytes in flight
(a deeper ring, session 12; a persistent grid, session 14) did not make it faster: its 6.8
instructions a code (sm_90 SASS; ``PRMT`` 2.3) take ~12 µs to issue at 14336x4096, ~16 with the
~4 µs any kernel takes under do_bench: above the read floor (docs/performance.md, session 14). It
does not scale with M (the float32 multiply-adds do), so from M = 2-4 the tensor-core variants win.

Codes are looked up on x's 16-bit grid (``_decode``'s register LUT asm) and multiplied in float32
(the fused family's tolerance, not dequantize's bits); a float16 x on a bfloat16 weight is looked up
in a table of each block's exact bfloat16 weights instead (EXACT in the kernel). Needs rows of whole quantization blocks
(K % blocksize == 0), a 16-bit x, and an NVIDIA GPU (Gluon, inline PTX): no interpreter, no AMD.
"""

import triton
import triton.language as tl

from ._decode import _LUT_F16_TO_F32, _LUT_OFFSET, _LUT_STRIDE, _lut_asm
from ._linear import lut_refusal
from .linear_mma_gemv import _block_table
from ._registry import Variant, VariantUnavailable, register

# float32 from plain bfloat16 planes (``_format.LUT_KINDS`` "bf16"): two codes paired into a
# bfloat16x2 word by one prmt, then widened by a shift (the low half) and a mask (the high half).
# 2 prmt a code in all, where the sign-filled planes of ``_decode.lut_values`` take 2.75; the
# lookup is bound by int32 work, and ptxas can put the shifts on the FMA pipe (27.6 -> 25.6 µs, S8.3).
_LUT_BF16_PAIRS_TO_F32 = tl.constexpr(_lut_asm(9, """
prmt.b32 p, lo, hi, 0x5140;
shl.b32 {e1}, p, 16;
and.b32 {e0}, p, 0xFFFF0000;
prmt.b32 p, lo, hi, 0x7362;
shl.b32 {e3}, p, 16;
and.b32 {e2}, p, 0xFFFF0000;
""", ".reg .b32 p;\n"))

try:  # Gluon as this file uses it ships with Triton 3.6
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 6):
        raise ImportError(f"Triton {triton.__version__} is older than 3.6")
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
except ImportError as exc:
    raise VariantUnavailable(f"linear_gemv_gluon needs Triton 3.6 or newer with Gluon: {exc}") from exc


@gluon.jit
def _copy_words(smem, words_ptr, word_at, w_mask, q_w, step, words_per_row, QUADS: gl.constexpr):
    """Starts the copy of one step's packed words [BLOCK_N, QUADS, 4] into ``smem`` (cp.async, 16
    bytes a thread and row; zeros past the row's end) as one commit group."""
    first = step * (QUADS * 4)
    cp.async_copy_global_to_shared(smem, words_ptr + word_at + first, mask=w_mask & (first + q_w < words_per_row))
    cp.commit_group()


@gluon.jit
def _step_loads(absmax_ptr, x_ptr, block_at, block_first, a_mask, x_at, col_x, x_mask, step, K,
                BLOCKSIZE: gl.constexpr, QUADS: gl.constexpr):
    """One step's absmax entries [BLOCK_N, QUADS] (uint8 codes or float32) and x [BLOCK_M, QUADS,
    4, 8], zero past the row's end."""
    first = step * (QUADS * 4)
    block = (first + block_first) * 8 // BLOCKSIZE
    absmax = gl.load(absmax_ptr + block_at + block, mask=a_mask & (block * BLOCKSIZE < K), other=0)
    x = gl.load(x_ptr + x_at + first * 8, mask=x_mask & (first * 8 + col_x < K), other=0.0)
    return absmax, x


@gluon.jit
def _step_absmax(q, code2_ptr, absmax2_ptr, offset, block_at, block_first, a_mask, step, BLOCKSIZE: gl.constexpr,
            NESTED_BLOCKSIZE: gl.constexpr, DOUBLE_QUANT: gl.constexpr, QUADS: gl.constexpr):
    """float32 absmax [BLOCK_N, QUADS] of a step from its entries ``q`` (decoding double quant)."""
    if DOUBLE_QUANT:
        block = block_at + (step * (QUADS * 4) + block_first) * 8 // BLOCKSIZE
        absmax = gl.load(code2_ptr + q.to(gl.int32)) * gl.load(absmax2_ptr + block // NESTED_BLOCKSIZE,
                                                               mask=a_mask, other=0.0)
        absmax = absmax + offset
    else:
        absmax = q
    return absmax


@gluon.jit
def _quads(plane, layout: gl.constexpr):
    """A step's plane [BLOCK_N, QUADS] as [BLOCK_N, QUADS, 1] in the words' layout (no data movement)."""
    return gl.convert_layout(plane, gl.SliceLayout(2, layout), assert_trivial=True)[:, :, None]


@gluon.jit
def linear_gemv_gluon_kernel(
    x_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr, bias_ptr, out_ptr,
    M, N, K,
    BLOCKSIZE: gl.constexpr, NESTED_BLOCKSIZE: gl.constexpr, QUANT_TYPE: gl.constexpr, DOUBLE_QUANT: gl.constexpr,
    HAS_BIAS: gl.constexpr, WEIGHT_DTYPE: gl.constexpr, K_IN_BLOCKS: gl.constexpr, PTX: gl.constexpr,
    BLOCK_M: gl.constexpr, ROWS: gl.constexpr, WARPS_N: gl.constexpr, STAGES: gl.constexpr,
):
    NW: gl.constexpr = gl.num_warps()
    WARPS_K: gl.constexpr = NW // WARPS_N
    BLOCK_N: gl.constexpr = ROWS * WARPS_N
    QUADS: gl.constexpr = 32 * WARPS_K  # 4-word groups per row and step
    # [BLOCK_M, BLOCK_N, QUADS, 4]: all x rows and ROWS weight rows in a thread, lanes along the words.
    L4: gl.constexpr = gl.BlockedLayout([BLOCK_M, ROWS, 1, 4], [1, 1, 32, 1], [1, WARPS_N, WARPS_K, 1], [3, 2, 1, 0])
    LW: gl.constexpr = gl.SliceLayout(0, L4)  # words and codes [BLOCK_N, QUADS, 4]
    LXJ: gl.constexpr = gl.SliceLayout(1, L4)  # one x column of every word [BLOCK_M, QUADS, 4]
    LS: gl.constexpr = gl.SliceLayout(3, L4)  # sums per 4 words [BLOCK_M, BLOCK_N, QUADS]
    LA: gl.constexpr = gl.SliceLayout(0, LS)  # absmax per 4 words [BLOCK_N, QUADS]
    LO: gl.constexpr = gl.SliceLayout(2, LS)  # the output tile [BLOCK_M, BLOCK_N]
    # x [BLOCK_M, QUADS, 4, 8]: a thread's 4 words' 8 columns (the WARPS_N warps of a column of
    # words hold copies: warps laid out over M, which each thread holds whole, as over N in L4).
    LX: gl.constexpr = gl.BlockedLayout([BLOCK_M, 1, 4, 8], [1, 32, 1, 1], [WARPS_N, WARPS_K, 1, 1], [3, 2, 1, 0])

    row0 = gl.program_id(0) * BLOCK_N
    m0 = gl.program_id(1) * BLOCK_M
    words_per_row = gl.multiple_of(K // 8, 4)  # K is a multiple of the blocksize, >= 32

    # Packed words: row n, word 4q + i of the step.
    n_w = row0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, gl.SliceLayout(2, LW)))
    q_w = (gl.arange(0, QUADS, layout=gl.SliceLayout(0, gl.SliceLayout(2, LW)))[None, :, None] * 4
           + gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, LW)))[None, None, :])
    word_at = gl.multiple_of(n_w.to(gl.int64) * words_per_row, 4)[:, None, None] + q_w
    w_mask = (n_w < N)[:, None, None]
    # Absmax: one per row and 4 words (the block of the quad's first word).
    n_a = row0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LA))
    block_at = (n_a.to(gl.int64) * (K // BLOCKSIZE))[:, None]
    block_first = gl.arange(0, QUADS, layout=gl.SliceLayout(0, LA))[None, :] * 4
    a_mask = (n_a < N)[:, None]
    # x: row m, column 8 * (4q + i) + j of the step.
    m_x = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, LX))))
    LQI: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(3, LX))  # [QUADS, 4]
    q_x = gl.arange(0, QUADS, layout=gl.SliceLayout(1, LQI))
    i_x = gl.arange(0, 4, layout=gl.SliceLayout(0, LQI))
    j_x = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, LX))))
    col_x = ((q_x[:, None] * 4 + i_x[None, :]) * 8)[None, :, :, None] + j_x[None, None, None, :]
    x_at = gl.multiple_of(m_x.to(gl.int64) * K, 8)[:, None, None, None] + col_x
    x_mask = (m_x < M)[:, None, None, None]

    # The LUT's byte planes (``_format.LUT_KINDS``: 1 = float16 codes, 2 = bfloat16 codes). prmt
    # takes them from ordinary registers: loaded at a lane-dependent offset (always 0, as K < 2^31),
    # they stay in eight registers, where uniform values would be moved in before every use.
    KIND: gl.constexpr = 1 if x_ptr.dtype.element_ty == gl.float16 else 2
    # A float16 x on a bfloat16 weight (state.dtype): the contract's weight is dequantize's bfloat16
    # value, which a lookup on x's float16 grid times the absmax misses by up to half a bfloat16
    # ulp. EXACT builds every step's table from its blocks' absmax instead (``_decode.block_planes``:
    # entries round_bf16(table * absmax), ~3 instructions an entry, once per 32 codes), so the
    # lookup gives the weights themselves and no absmax multiplies the sums.
    EXACT: gl.constexpr = KIND == 1 and WEIGHT_DTYPE == gl.bfloat16
    ASM: gl.constexpr = _LUT_F16_TO_F32 if KIND == 1 and not EXACT else _LUT_BF16_PAIRS_TO_F32
    lane = gl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [gl.full([1, 1, 1], 0, gl.int32, LW)],
                                     dtype=gl.int32, is_pure=True, pack=1)
    planes = table_ptr.to(gl.pointer_type(gl.int32)) + _LUT_OFFSET + KIND * _LUT_STRIDE + (lane & (K >> 31))
    l0, l1, l2, l3 = gl.load(planes), gl.load(planes + 1), gl.load(planes + 2), gl.load(planes + 3)
    h0, h1, h2, h3 = gl.load(planes + 4), gl.load(planes + 5), gl.load(planes + 6), gl.load(planes + 7)
    offset = 0.0
    if DOUBLE_QUANT:
        offset = gl.load(offset_ptr)

    # The packed words stream through a ring of STAGES steps in shared memory (cp.async: the
    # bytes in flight take no registers). Each thread reads back only the words it copied, so no
    # barrier is needed: waiting for its own copies is enough.
    words_ptr = packed_ptr.to(gl.pointer_type(gl.int32))
    ring = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, QUADS, 4],
                                     gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
    for s in gl.static_range(STAGES - 1):
        _copy_words(ring.index(s), words_ptr, word_at, w_mask, q_w, s, words_per_row, QUADS)
    acc = gl.zeros([BLOCK_M, BLOCK_N, QUADS], gl.float32, LS)
    q, x = _step_loads(absmax_ptr, x_ptr, block_at, block_first, a_mask, x_at, col_x, x_mask, 0, K, BLOCKSIZE, QUADS)
    for step in range(gl.cdiv(words_per_row, QUADS * 4)):
        # The slot refilled here was read (by this thread) in the previous step.
        _copy_words(ring.index((step + STAGES - 1) % STAGES), words_ptr, word_at, w_mask, q_w, step + STAGES - 1,
                    words_per_row, QUADS)
        next_q, next_x = _step_loads(absmax_ptr, x_ptr, block_at, block_first, a_mask, x_at, col_x, x_mask,
                                     step + 1, K, BLOCKSIZE, QUADS)
        cp.wait_group(STAGES - 1)
        words = ring.index(step % STAGES).load(LW)
        if EXACT:
            b0, b1, b2, b3, b4, b5, b6, b7 = _block_table(
                _step_absmax(q, code2_ptr, absmax2_ptr, offset, block_at, block_first, a_mask, step, BLOCKSIZE,
                             NESTED_BLOCKSIZE, DOUBLE_QUANT, QUADS), QUANT_TYPE, False)
            e0, e1, e2, e3, e4, e5, e6, e7 = gl.inline_asm_elementwise(
                ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r",
                [words, _quads(b0, LW), _quads(b1, LW), _quads(b2, LW), _quads(b3, LW), _quads(b4, LW),
                 _quads(b5, LW), _quads(b6, LW), _quads(b7, LW)],
                dtype=(gl.float32,) * 8, is_pure=True, pack=1)
        else:
            e0, e1, e2, e3, e4, e5, e6, e7 = gl.inline_asm_elementwise(
                ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r", [words, l0, l1, l2, l3, h0, h1, h2, h3],
                dtype=(gl.float32,) * 8, is_pure=True, pack=1)
        # Column j = 4a + 2b + c of every word: split on c, then b, then a.
        x_even, x_odd = gl.split(gl.reshape(x, [BLOCK_M, QUADS, 4, 2, 2, 2]))
        x04, x26 = gl.split(x_even)
        x15, x37 = gl.split(x_odd)
        x0, x4 = gl.split(x04)
        x2, x6 = gl.split(x26)
        x1, x5 = gl.split(x15)
        x3, x7 = gl.split(x37)
        part = _column(x0, LXJ)[:, None] * e0[None, :]
        part = gl.fma(_column(x1, LXJ)[:, None], e1[None, :], part)
        part = gl.fma(_column(x2, LXJ)[:, None], e2[None, :], part)
        part = gl.fma(_column(x3, LXJ)[:, None], e3[None, :], part)
        part = gl.fma(_column(x4, LXJ)[:, None], e4[None, :], part)
        part = gl.fma(_column(x5, LXJ)[:, None], e5[None, :], part)
        part = gl.fma(_column(x6, LXJ)[:, None], e6[None, :], part)
        part = gl.fma(_column(x7, LXJ)[:, None], e7[None, :], part)
        if EXACT:
            acc += gl.sum(part, axis=3)
        else:
            absmax = _step_absmax(q, code2_ptr, absmax2_ptr, offset, block_at, block_first, a_mask, step,
                                  BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT, QUADS)
            acc = gl.fma(gl.sum(part, axis=3), absmax[None, :, :], acc)
        q, x = next_q, next_x
    cp.wait_group(0)  # the (zero-filling) copies past the last step land before the program ends

    result = gl.sum(acc, axis=2)
    n_o = row0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, LO))
    m_o = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, LO))
    if HAS_BIAS:
        result += gl.load(bias_ptr + n_o, mask=n_o < N, other=0.0).to(gl.float32)[None, :]
    out = out_ptr + m_o.to(gl.int64)[:, None] * N + n_o[None, :]
    gl.store(out, result.to(out_ptr.dtype.element_ty), mask=(m_o < M)[:, None] & (n_o < N)[None, :])


@gluon.jit
def _column(x, layout: gl.constexpr):
    """One x column of every word, as float32 in the layout the codes meet it in (the split
    already put it there: the conversion moves nothing)."""
    return gl.convert_layout(x, layout, assert_trivial=True).to(gl.float32)


def _grid(args, config):
    return (triton.cdiv(args.n, config["ROWS"] * config["WARPS_N"]), triton.cdiv(args.m, config["BLOCK_M"]))


def _accepts(args):
    if args.blocksize < 32:
        return (f"linear_gemv_gluon reads 4 packed words (32 codes) per absmax; blocksize {args.blocksize} "
                "is smaller: use linear_gemv")
    return lut_refusal(args, "linear_gemv_gluon", "decodes codes on a 16-bit grid", block_tables=True)


register(Variant(
    name="linear_gemv_gluon",
    family="linear",
    kernel=linear_gemv_gluon_kernel,
    grid=_grid,
    space={
        "BLOCK_M": (1, 2),
        "ROWS": (2, 4),
        "WARPS_N": (1, 2, 4, 8),
        "STAGES": (2, 3, 4),
        "num_warps": (2, 4, 8),
        "num_stages": (1,),
    },
    default={"BLOCK_M": 1, "ROWS": 4, "WARPS_N": 2, "STAGES": 2, "num_warps": 2, "num_stages": 1},
    description="fused GEMV in Gluon: register LUT decode, x and codes in one explicit layout, words by cp.async",
    # At most two warps share a row's words (a step is 128 words a warp: K = 4096 has 512 a row).
    allowed=lambda config, blocksize: (config["num_warps"] % config["WARPS_N"] == 0
                                       and config["num_warps"] // config["WARPS_N"] <= 2 and blocksize >= 32),
    min_capability=(8, 0),
    accepts=_accepts,
))
