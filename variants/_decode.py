"""Device code shared by every variant: nibble decoding and the (double-quantized) absmax.

Exactness rules (bitsandbytes 0.50, bit for bit):
- the weight is ``table[nibble] * absmax`` in float32, then ONE cast to the output dtype;
- a double-quantized absmax is ``code2[q] * absmax2[b // NESTED_BLOCKSIZE]`` rounded to float32,
  then ``+ offset`` rounded again. Every launch passes ``enable_fp_fusion=False`` (see
  ``_launch.launch_options``) so the compiler cannot fuse that multiply and add into one FMA.
"""

import struct

import triton
import triton.language as tl

from ._format import FP4_TABLE, LUT_OFFSET, LUT_STRIDE, NF4_TABLE, QUANT_TYPE_IDS, interpreter_enabled

# Triton's interpreter casts float32 to bfloat16 by truncation (triton 3.6 runtime/interpreter.py
# _convert_float), while GPUs round to nearest even (cvt.rn.bf16.f32) as bitsandbytes does. Under
# the interpreter the kernels round explicitly so CPU tests check the same bits; on a GPU this
# constant is False and the branch is compiled away.
INTERPRETER = tl.constexpr(interpreter_enabled())

# QUANT_TYPE constexpr values.
NF4 = QUANT_TYPE_IDS["nf4"]
FP4 = QUANT_TYPE_IDS["fp4"]

# The tables as compile-time constants for the register decode.
_N = [tl.constexpr(v) for v in NF4_TABLE]
_F = [tl.constexpr(v) for v in FP4_TABLE[:8]]
N0, N1, N2, N3, N4, N5, N6, N7, N8, N9, N10, N11, N12, N13, N14, N15 = _N
F0, F1, F2, F3, F4, F5, F6, F7 = _F


@triton.jit
def _select8(code, v0, v1, v2, v3, v4, v5, v6, v7):
    """Picks v[code & 7] with a 3-level tree of selects on the low three bits (7 selects)."""
    b0 = (code & 1) != 0
    b1 = (code & 2) != 0
    b2 = (code & 4) != 0
    s01 = tl.where(b0, v1, v0)
    s23 = tl.where(b0, v3, v2)
    s45 = tl.where(b0, v5, v4)
    s67 = tl.where(b0, v7, v6)
    s03 = tl.where(b1, s23, s01)
    s47 = tl.where(b1, s67, s45)
    return tl.where(b2, s47, s03)


@triton.jit
def decode_code(code, table_ptr, QUANT_TYPE: tl.constexpr, TABLE_IN_REGISTERS: tl.constexpr):
    """float32 table value of a 4-bit ``code`` (int32 tensor, 0..15).

    TABLE_IN_REGISTERS: a tree of selects on constants (no memory access), else a gather from the
    16-entry float32 table at ``table_ptr`` (L1-resident).
    """
    if TABLE_IN_REGISTERS:
        if QUANT_TYPE == 0:
            low = _select8(code, N0, N1, N2, N3, N4, N5, N6, N7)
            high = _select8(code, N8, N9, N10, N11, N12, N13, N14, N15)
            value = tl.where((code & 8) != 0, high, low)
        else:
            # bit 3 is the sign; negation is exact (and gives -0.0 for code 8, as bitsandbytes).
            magnitude = _select8(code, F0, F1, F2, F3, F4, F5, F6, F7)
            value = tl.where((code & 8) != 0, -magnitude, magnitude)
    else:
        value = tl.load(table_ptr + code)
    return value


@triton.jit
def load_absmax(
    absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, block, mask, group,
    NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, GROUP_IS_SCALAR: tl.constexpr,
):
    """float32 absmax of quantization block(s) ``block`` (an index tensor), decoding double quant.

    GROUP_IS_SCALAR: every block of the call lies in nested group ``group`` (a scalar), so absmax2
    is loaded once instead of once per element.
    """
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        if GROUP_IS_SCALAR:
            scale2 = tl.load(absmax2_ptr + group)
        else:
            scale2 = tl.load(absmax2_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        absmax = tl.load(code2_ptr + q) * scale2
        absmax = absmax + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return absmax


@triton.jit
def dequantize_codes(
    codes, block, mask,
    absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr,
    NESTED_BLOCKSIZE: tl.constexpr, QUANT_TYPE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    TABLE_IN_REGISTERS: tl.constexpr, group=0, GROUP_IS_SCALAR: tl.constexpr = False,
):
    """float32 weights for 4-bit ``codes`` whose quantization blocks are ``block`` (see load_absmax
    for ``group``/GROUP_IS_SCALAR)."""
    absmax = load_absmax(
        absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, block, mask, group, NESTED_BLOCKSIZE, DOUBLE_QUANT,
        GROUP_IS_SCALAR,
    )
    return decode_code(codes, table_ptr, QUANT_TYPE, TABLE_IN_REGISTERS) * absmax


@triton.jit
def round_to(values, DTYPE: tl.constexpr):
    """Casts float32 ``values`` to ``DTYPE`` once, rounding to nearest even (also in the interpreter,
    which truncates to bfloat16)."""
    if INTERPRETER and DTYPE == tl.bfloat16:
        bits = values.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return values.to(DTYPE)


@triton.jit
def to_output(values, out_ptr):
    """Casts float32 ``values`` to ``out_ptr``'s dtype once, rounding to nearest even."""
    return round_to(values, out_ptr.dtype.element_ty)


@triton.jit
def element_codes(packed_ptr, idx, mask):
    """The 4-bit code of each element index ``idx``: the high nibble of byte idx//2 for even idx,
    the low nibble for odd idx (shift arithmetic, no select)."""
    byte = tl.load(packed_ptr + (idx >> 1), mask=mask, other=0).to(tl.int32)
    shift = ((idx & 1) ^ 1).to(tl.int32) * 4
    return (byte >> shift) & 0xF


@triton.jit
def weight_tile(
    packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr, rows, row_mask, k_start, K,
    BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, QUANT_TYPE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr, WEIGHT_DTYPE: tl.constexpr,
):
    """The dequantized weight tile [len(rows), BLOCK_K] in WEIGHT_DTYPE, decoded element by element
    (for any K: rows may straddle quantization blocks), bit-identical to what dequantize writes for
    those elements (0 past K)."""
    cols = k_start + tl.arange(0, BLOCK_K)
    idx = rows.to(tl.int64)[:, None] * K + cols[None, :]
    mask = row_mask[:, None] & (cols < K)[None, :]
    values = dequantize_codes(element_codes(packed_ptr, idx, mask), idx // BLOCKSIZE, mask, absmax_ptr, code2_ptr,
                              absmax2_ptr, offset_ptr, table_ptr, NESTED_BLOCKSIZE, QUANT_TYPE, DOUBLE_QUANT, False)
    return round_to(tl.where((cols < K)[None, :], values, 0.0), WEIGHT_DTYPE)


@triton.jit
def dot(a, b, acc):
    """``acc + a @ b`` in float32 on the tensor cores. float32 inputs keep full precision (no TF32),
    as F.linear does by default. Triton 3.6's interpreter multiplies bfloat16 tiles as raw bits, so
    there the tiles are widened to float32 first (exact: a product of two bfloat16 fits float32)."""
    if INTERPRETER:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def weight_words(packed_ptr, rows, row_mask, k_start, K, WORDS: tl.constexpr):
    """The packed 32-bit words [len(rows), WORDS] of weight rows ``rows`` from column k_start (a
    multiple of 8): word w holds columns k_start + 8w .. k_start + 8w + 7 (K % 8 == 0). Words past
    K read as 0."""
    words_per_row = K // 8
    col_words = k_start // 8 + tl.arange(0, WORDS)
    word = rows.to(tl.int64)[:, None] * words_per_row + col_words[None, :]
    mask = row_mask[:, None] & (col_words < words_per_row)[None, :]
    return tl.load(packed_ptr.to(tl.pointer_type(tl.int32)) + word, mask=mask, other=0)


@triton.jit
def word_absmax(
    absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, rows, row_mask, k_start, K,
    WORDS: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
):
    """float32 absmax [len(rows), WORDS] of each packed word of a weight tile whose rows hold
    whole blocks (K % BLOCKSIZE == 0): the 8 codes of a word share one block."""
    cols = k_start + tl.arange(0, WORDS) * 8
    block = rows.to(tl.int64)[:, None] * (K // BLOCKSIZE) + (cols // BLOCKSIZE)[None, :]
    mask = row_mask[:, None] & (cols < K)[None, :]
    return load_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, block, mask, 0, NESTED_BLOCKSIZE,
                       DOUBLE_QUANT, False)


@triton.jit
def byte_pair_values(words, BYTE: tl.constexpr, table_ptr):
    """The float32 values of the two codes in byte BYTE (0..3, little-endian) of each word: (even
    element = high nibble, odd element = low nibble), one 64-bit load from the pair table."""
    byte = (words >> (8 * BYTE)) & 0xFF
    pair = tl.load((table_ptr + 16).to(tl.pointer_type(tl.int64)) + byte)
    even = (pair & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
    odd = ((pair >> 32) & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
    return even, odd


# The LUT decode: 8 codes of a packed 32-bit word looked up in registers with PTX ``prmt`` (byte
# permute), the 16-entry table held as byte planes (see _format.LUT_KINDS). For each half-word
# (4 codes) and each byte plane: one prmt picks from codes 0-7, one from codes 8-15 (on the low
# 3 bits of each code), one picks between them on bit 3: ~3 int32 operations per code in all,
# where a 4-level tree of selects costs 15. Nibble order: byte b of a word holds elements 2b (high
# nibble) and 2b + 1 (low nibble), so a half-word's bytes come out as elements 1, 0, 3, 2.
_LUT_SELECT = """
and.b32 s, $8, 0x77777777;
shr.u32 t, $8, 1;
and.b32 t, t, 0x44444444;
or.b32 t, t, 0x32103210;
"""
_LUT_HALF = """
prmt.b32 a, {l0}, {l1}, s;
prmt.b32 b, {l2}, {l3}, s;
prmt.b32 lo, a, b, t;
prmt.b32 a, {h0}, {h1}, s;
prmt.b32 b, {h2}, {h3}, s;
prmt.b32 hi, a, b, t;
"""
_LUT_NEXT_HALF = "shr.u32 s, s, 16;\nshr.u32 t, t, 16;\n"


def _lut_asm(planes_at: int, body: str, registers: str) -> str:
    """The asm of one word: selectors, then per half-word the plane lookups and ``body`` (which
    turns lo/hi into the half's four elements; {e1} {e0} {e3} {e2} are its output operands)."""
    names = dict(zip(("l0", "l1", "l2", "l3", "h0", "h1", "h2", "h3"), (f"${planes_at + i}" for i in range(8))))
    halves = [_LUT_HALF.format(**names) + body.format(e1=f"${1 + o}", e0=f"${o}", e3=f"${3 + o}", e2=f"${2 + o}")
              for o in (0, 4)]
    return "{\n.reg .b32 s, t, a, b, lo, hi;\n" + registers + _LUT_SELECT + halves[0] + _LUT_NEXT_HALF + halves[1] + "}"


# float32 from bfloat16 planes: [sign fill, sign fill, low byte, high byte] per element.
_LUT_BF16_TO_F32 = _lut_asm(9, """
prmt.b32 {e1}, lo, hi, 0x40CC;
prmt.b32 {e0}, lo, hi, 0x51DD;
prmt.b32 {e3}, lo, hi, 0x62EE;
prmt.b32 {e2}, lo, hi, 0x73FF;
""", "")
# float32 from float16 planes: pairs interleaved into f16x2, then widened.
_LUT_F16_TO_F32 = _lut_asm(9, """
prmt.b32 p, lo, hi, 0x5140;
mov.b32 {{x, y}}, p;
cvt.f32.f16 {e1}, x;
cvt.f32.f16 {e0}, y;
prmt.b32 p, lo, hi, 0x7362;
mov.b32 {{x, y}}, p;
cvt.f32.f16 {e3}, x;
cvt.f32.f16 {e2}, y;
""", ".reg .b32 p;\n.reg .b16 x, y;\n")
# 16-bit weights: pairs interleaved, then times the word's absmax ($9, float32) rounded to the
# same type (one rounding of the exact product: fma with -0.0).
_LUT_WEIGHTS = """
prmt.b32 p, lo, hi, 0x5140;
fma.rn.{t}x2 p, p, scale, nzero;
mov.b32 {{{{{{e1}}, {{e0}}}}}}, p;
prmt.b32 p, lo, hi, 0x7362;
fma.rn.{t}x2 p, p, scale, nzero;
mov.b32 {{{{{{e3}}, {{e2}}}}}}, p;
"""
_LUT_SCALE = ".reg .b32 p, scale, nzero;\ncvt.rn.{t}x2.f32 scale, $9, $9;\nmov.b32 nzero, 0x80008000;\n"
_LUT_BF16_WEIGHTS = _lut_asm(10, _LUT_WEIGHTS.format(t="bf16"), _LUT_SCALE.format(t="bf16"))
_LUT_F16_WEIGHTS = _lut_asm(10, _LUT_WEIGHTS.format(t="f16"), _LUT_SCALE.format(t="f16"))


def _f32_immediate(value: float) -> str:
    """``value`` as a PTX float32 immediate (its bits: 0f3F800000 is 1.0)."""
    return "0f%08X" % struct.unpack("<I", struct.pack("<f", value))[0]


def _block_planes_asm(table: tuple, f16: bool) -> str:
    """asm: the byte planes ($0-$7, as ``_format.LUT_KINDS``' sections) of a register LUT whose 16
    entries are one quantization block's weights, ``table[i]`` times the block's float32 absmax
    ($8) rounded to float32 then once to bfloat16: dequantize's bits for a bfloat16 weight. With
    ``f16`` the entries are those bfloat16 values as float16 (exact in float16's normal range, one
    rounding below it: ``Tensor.to``'s). Entries 2j, 2j + 1 are computed as a packed pair, then
    the pairs' low and high bytes are gathered into planes by prmt: ~3 instructions an entry."""
    lines = ["{", ".reg .b32 u, v, p<8>;"]
    for j in range(8):
        lines += [f"mul.rn.f32 u, $8, {_f32_immediate(table[2 * j + 1])};",
                  f"mul.rn.f32 v, $8, {_f32_immediate(table[2 * j])};",
                  f"cvt.rn.bf16x2.f32 p{j}, u, v;"]  # entry 2j + 1 in the high half
        if f16:
            lines += [f"shl.b32 u, p{j}, 16;", f"and.b32 v, p{j}, 0xFFFF0000;", f"cvt.rn.f16x2.f32 p{j}, v, u;"]
    for i in range(4):
        lines += [f"prmt.b32 ${i}, p{2 * i}, p{2 * i + 1}, 0x6420;",  # low bytes of entries 4i..4i+3
                  f"prmt.b32 ${4 + i}, p{2 * i}, p{2 * i + 1}, 0x7531;"]  # their high bytes
    return "\n".join(lines + ["}"])


_BLOCK_PLANES = {(qt, f16): _block_planes_asm(table, f16) for qt, table in ((NF4, NF4_TABLE), (FP4, FP4_TABLE))
                 for f16 in (False, True)}


@triton.constexpr_function
def block_planes(quant_type, f16):
    """The asm of ``_block_planes_asm`` for QUANT_TYPE ``quant_type`` (float16 entries where ``f16``)."""
    return _BLOCK_PLANES[(quant_type, f16)]


# As compile-time constants for the kernels.
_LUT_BF16_TO_F32, _LUT_F16_TO_F32, _LUT_BF16_WEIGHTS, _LUT_F16_WEIGHTS = (
    tl.constexpr(a) for a in (_LUT_BF16_TO_F32, _LUT_F16_TO_F32, _LUT_BF16_WEIGHTS, _LUT_F16_WEIGHTS))
_LUT_OFFSET = tl.constexpr(LUT_OFFSET)
_LUT_STRIDE = tl.constexpr(LUT_STRIDE)


@triton.jit
def _lut_planes(table_ptr, KIND: tl.constexpr):
    planes = table_ptr.to(tl.pointer_type(tl.int32)) + _LUT_OFFSET + KIND * _LUT_STRIDE
    return (tl.load(planes), tl.load(planes + 1), tl.load(planes + 2), tl.load(planes + 3),
            tl.load(planes + 4), tl.load(planes + 5), tl.load(planes + 6), tl.load(planes + 7))


@triton.jit
def _lut_fallback(words, table_ptr, KIND: tl.constexpr):
    """The same 8 float32 values by gathers from the section's value list (no PTX)."""
    values = table_ptr + _LUT_OFFSET + KIND * _LUT_STRIDE + 8
    return (tl.load(values + ((words >> 4) & 15)), tl.load(values + (words & 15)),
            tl.load(values + ((words >> 12) & 15)), tl.load(values + ((words >> 8) & 15)),
            tl.load(values + ((words >> 20) & 15)), tl.load(values + ((words >> 16) & 15)),
            tl.load(values + ((words >> 28) & 15)), tl.load(values + ((words >> 24) & 15)))


@triton.jit
def lut_values(words, table_ptr, X_DTYPE: tl.constexpr, PTX: tl.constexpr):
    """The 8 codes of every packed int32 word as float32 values on the 16-bit grid of X_DTYPE
    (bfloat16: within 2^-16 ulp of the bfloat16 code; float16: the float16 code): elements
    0..7 of the word, each a tensor of words' shape. PTX: the register LUT, else gathers."""
    KIND: tl.constexpr = 1 if X_DTYPE == tl.float16 else 0
    if PTX:
        l0, l1, l2, l3, h0, h1, h2, h3 = _lut_planes(table_ptr, KIND)
        asm: tl.constexpr = _LUT_F16_TO_F32 if KIND == 1 else _LUT_BF16_TO_F32
        return tl.inline_asm_elementwise(
            asm, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r", [words, l0, l1, l2, l3, h0, h1, h2, h3],
            dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    return _lut_fallback(words, table_ptr, KIND)


@triton.jit
def lut_weights(words, absmax, table_ptr, DTYPE: tl.constexpr, PTX: tl.constexpr):
    """The 8 weights of every packed int32 word in DTYPE (bfloat16 or float16): the code in DTYPE
    times the word's float32 ``absmax`` rounded to DTYPE, rounded once (a 16-bit weight within
    the linear family's tolerance, not dequantize's bits). Elements 0..7 of the word."""
    KIND: tl.constexpr = 1 if DTYPE == tl.float16 else 2
    if PTX:
        l0, l1, l2, l3, h0, h1, h2, h3 = _lut_planes(table_ptr, KIND)
        if KIND == 1:
            weights = tl.inline_asm_elementwise(
                _LUT_F16_WEIGHTS, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r,r,r,r,r,r",
                [words, absmax, l0, l1, l2, l3, h0, h1, h2, h3], dtype=(tl.float16,) * 8, is_pure=True, pack=1)
        else:
            weights = tl.inline_asm_elementwise(
                _LUT_BF16_WEIGHTS, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r,r,r,r,r,r",
                [words, absmax, l0, l1, l2, l3, h0, h1, h2, h3], dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
        return weights
    scale = round_to(absmax, DTYPE).to(tl.float32)
    e0, e1, e2, e3, e4, e5, e6, e7 = _lut_fallback(words, table_ptr, KIND)
    return (round_to(e0 * scale, DTYPE), round_to(e1 * scale, DTYPE), round_to(e2 * scale, DTYPE),
            round_to(e3 * scale, DTYPE), round_to(e4 * scale, DTYPE), round_to(e5 * scale, DTYPE),
            round_to(e6 * scale, DTYPE), round_to(e7 * scale, DTYPE))


@triton.jit
def word_columns(x_rows, col_words, mask, DTYPE: tl.constexpr):
    """x's 8 columns of every packed word ``col_words`` (rows ``x_rows`` [BLOCK_M, 1, 1] pointers):
    one 16-byte load per word, cast to DTYPE and split into column j = 0..7 of every word,
    [BLOCK_M, WORDS] each (0 where ``mask`` [BLOCK_M, WORDS, 1] is false)."""
    x = tl.load(x_rows + (col_words * 8)[None, :, None] + tl.arange(0, 8)[None, None, :], mask=mask,
                other=0.0).to(DTYPE)
    # split takes the last axis: j = 4a + 2b + c is split on c, then b, then a.
    x_even, x_odd = tl.split(tl.reshape(x, (x.shape[0], x.shape[1], 2, 2, 2)))
    x04, x26 = tl.split(x_even)
    x15, x37 = tl.split(x_odd)
    x0, x4 = tl.split(x04)
    x2, x6 = tl.split(x26)
    x1, x5 = tl.split(x15)
    x3, x7 = tl.split(x37)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def step_absmax(
    absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, block_rows, row_mask, word_start, K,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    BLOCKS: tl.constexpr, PER_BLOCK: tl.constexpr,
):
    """float32 absmax [len(rows), BLOCKS] of a step of BLOCKS * PER_BLOCK packed words from word
    ``word_start`` of rows holding whole blocks (``block_rows``: each row's first block, [rows, 1])."""
    block = word_start * 8 // BLOCKSIZE + tl.arange(0, BLOCKS) * (PER_BLOCK * 8 // BLOCKSIZE)
    mask = row_mask[:, None] & (block < K // BLOCKSIZE)[None, :]
    return load_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, block_rows + block[None, :], mask, 0,
                       NESTED_BLOCKSIZE, DOUBLE_QUANT, False)


@triton.jit
def lut_step_weights(
    w_rows, block_rows, row_mask, word_start, words_per_row, K, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr,
    table_ptr, DTYPE: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr, WORDS: tl.constexpr, PTX: tl.constexpr,
):
    """One step of the register-LUT GEMMs: the 16-bit weights (``lut_weights``: elements 0..7 of
    every word, [rows, WORDS] each) of the WORDS packed words from word ``word_start`` of weight
    rows that hold whole blocks. ``w_rows`` [rows, 1]: int32 pointers to each row's words;
    ``block_rows`` [rows, 1]: each row's first block. Words past the row's end read as 0."""
    # The step's WORDS words per row hold BLOCKS quantization blocks of PER_BLOCK words.
    PER_BLOCK: tl.constexpr = min(BLOCKSIZE // 8, WORDS)
    BLOCKS: tl.constexpr = WORDS // PER_BLOCK
    col_words = word_start + tl.arange(0, WORDS)
    words = tl.load(w_rows + col_words[None, :], mask=row_mask[:, None] & (col_words < words_per_row)[None, :],
                    other=0)
    absmax = step_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, block_rows, row_mask, word_start, K,
                         BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT, BLOCKS, PER_BLOCK)
    rows: tl.constexpr = w_rows.shape[0]
    absmax = tl.reshape(tl.broadcast_to(absmax[:, :, None], (rows, BLOCKS, PER_BLOCK)), (rows, WORDS))
    return lut_weights(words, absmax, table_ptr, DTYPE, PTX)


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(tile along M, tile along N) of this program in grouped order (Triton's tutorial 03): GROUP_M
    tiles along M run next to each other, so that neighbouring programs share weight tiles in L2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    first_m = pid // (GROUP_M * tiles_n) * GROUP_M
    group_size = min(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % (GROUP_M * tiles_n)) % group_size
    tile_n = (pid % (GROUP_M * tiles_n)) // group_size
    return tile_m, tile_n
