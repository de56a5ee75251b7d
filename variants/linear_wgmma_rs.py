"""linear_wgmma_rs: ``linear_wgmma`` with the decoded weight fed to the warpgroup MMA from registers
(Hopper ``wgmma`` with A in registers, Gluon): no shared-memory round trip for the weight.

``out.T = W @ x.T``: a program owns BLOCK_N weight rows (16 a warp, or a multiple: the MMA's M
side) and BLOCK_M rows of x (its N side) and walks K in steps of BLOCK_K columns. The MMA's A
fragment gives lane (g, t) of a warp the columns {2t, 2t + 1, 2t + 8, 2t + 9} of each 16 columns of
rows g and g + 8: in a 32-column chunk of a row (four packed words, 16 bytes), byte t of each word.
So every lane reads its rows' 16-byte chunks from shared memory (the four lanes of a group read
the same bytes), gathers byte t of each word into one word (``prmt``) and decodes it with
``_decode``'s byte-plane lookup, scaled by the block's absmax: its four 16-bit pairs are exactly
its A registers for the chunk. x's tile is the MMA's B operand in shared memory, as copied.

A step: the MMA of step i is issued asynchronously; while it runs, step i + 1's words are decoded
into other registers; copies of the packed words and x run STAGES - 1 steps ahead (cp.async), one
CTA barrier a step. Needs rows of whole quantization blocks, a 16-bit x and compute capability 9.0.

Measured (S17.1, H200): within the contract (44 checks) but slower than ``linear_wgmma`` everywhere
(14336x4096 M = 256: 86.2 µs against 72.4; M = 64: 54.4 against 45.0): the gather, the per-chunk
scale and four times the absmax loads cost 29% more instructions than the shared-memory store they
replace (Nsight Compute, S17.4). Kept in the repository's history only (docs/performance.md, session 17).
"""

import re

import triton
import triton.language as tl

from ._linear import lut_refusal
from .linear_lut_gemm import split_k_run
from .linear_mma_gemv import _absmax, _word_pairs
from .linear_wgmma import _planes, _steps, _store_tile, cp_async_refusal
from ._registry import SHARED_MEMORY_LIMIT, Variant, VariantUnavailable, register

try:  # Gluon as this file uses it ships with Triton 3.6
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 6):
        raise ImportError(f"Triton {triton.__version__} is older than 3.6")
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait
except ImportError as exc:
    raise VariantUnavailable(f"linear_wgmma_rs needs Triton 3.6 or newer with Gluon: {exc}") from exc


def _decode_asm(dtype: str) -> str:
    """asm, two elements an instance (``pack=2``; each 32-bit input comes twice): byte t ($14) of
    each of four packed words ($4, $6, $8, $10) gathered into one word and decoded to four 16-bit x2
    words in k order ($0-$3), times the float32 absmax ($12) rounded to the 16-bit type. Byte planes
    $16, $18, ..., $30."""
    body = ("{\n.reg .b32 s, t, a, b, lo, hi, nz, sc, sel, w01, w23, w;\nmov.b32 nz, 0x80008000;\n"
            "cvt.rn.T.f32 sc, $12, $12;\n"
            "shl.b32 sel, $14, 4;\nadd.u32 sel, sel, 64;\nor.b32 sel, sel, $14;\n"  # bytes t and 4 + t
            "prmt.b32 w01, $4, $6, sel;\nprmt.b32 w23, $8, $10, sel;\nprmt.b32 w, w01, w23, 0x5410;\n"
            + _word_pairs("w", "sc", ("$0", "$1", "$2", "$3"), first_plane=100) + "}")
    body = re.sub(r"\$10([0-7])\b", lambda plane: f"${16 + 2 * int(plane.group(1))}", body)
    return body.replace(".T", f".{dtype}x2")


_DECODE_BF16, _DECODE_F16 = tl.constexpr(_decode_asm("bf16")), tl.constexpr(_decode_asm("f16"))


@gluon.constexpr_function
def _word_layout(block_n, chunks, num_warps):
    """[BLOCK_N, CHUNKS, 4 (t), 4 (word)]: lane (g, t) of warp w holds the four words of each chunk
    of rows 16 r + g and 16 r + g + 8 for its row tiles r = w, w + num_warps, ...; registers in
    the order of the MMA's A fragment (row + 8, then the chunks, then the row tiles)."""
    def bits(n):
        return [1 << i for i in range(n.bit_length() - 1)]
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 0, 1], [0, 0, 0, 2], [8, 0, 0, 0]] + [[0, c, 0, 0] for c in bits(chunks)]
        + [[16 * num_warps * r, 0, 0, 0] for r in bits(block_n // (16 * num_warps))],
        lane_bases=[[0, 0, 1, 0], [0, 0, 2, 0], [1, 0, 0, 0], [2, 0, 0, 0], [4, 0, 0, 0]],
        warp_bases=[[16 * w, 0, 0, 0] for w in bits(num_warps)],
        block_bases=[],
        shape=[block_n, chunks, 4, 4])


@gluon.constexpr_function
def _pair_layout(block_n, chunks, num_warps):
    """[BLOCK_N, CHUNKS, 4 (t), 2 (h)]: ``_word_layout`` with the two 16-bit halves of a pair in
    place of the four words."""
    words = _word_layout(block_n, chunks, num_warps)
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 0, 1]] + [basis[:3] + [0] for basis in words.reg_bases[2:]],
        lane_bases=[basis[:3] + [0] for basis in words.lane_bases],
        warp_bases=[basis[:3] + [0] for basis in words.warp_bases],
        block_bases=[],
        shape=[block_n, chunks, 4, 2])


@gluon.jit
def _copy_step(w_slot, x_slot, words_ptr, w_at, w_mask, w_col, x_ptr, x_at, x_mask, x_col, step, K,
               BLOCK_K: gl.constexpr):
    """Starts the copies of step ``step``'s packed words [CHUNKS, BLOCK_N, 4] and x's tile [BLOCK_M,
    BLOCK_K] into ring slots (cp.async, 16-byte pieces; zeros past K and past the rows)."""
    first = step * BLOCK_K
    cp.async_copy_global_to_shared(w_slot, words_ptr + w_at + first // 8, mask=w_mask & (first + w_col < K))
    cp.async_copy_global_to_shared(x_slot, x_ptr + x_at + first, mask=x_mask & (first + x_col < K))
    cp.commit_group()


@gluon.jit
def _next_step(w_ring, x_ring, words_ptr, w_at, w_mask, w_col, x_ptr, x_at, x_mask, x_col, step, K,
               BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
    """After step - 1's MMA: waits for step + 1's copies (every thread's), then starts step + STAGES - 1's
    into step - 1's slots."""
    cp.wait_group(STAGES - 3)
    fence_async_shared()
    gl.thread_barrier()
    slot = (step + STAGES - 1) % STAGES
    _copy_step(w_ring.index(slot), x_ring.index(slot), words_ptr, w_at, w_mask, w_col, x_ptr, x_at, x_mask, x_col,
               step + STAGES - 1, K, BLOCK_K)


@gluon.jit
def _step_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, blocks_at, mask, chunk_code, step, K,
                 BLOCK_K: gl.constexpr, BLOCKSIZE: gl.constexpr, NESTED_BLOCKSIZE: gl.constexpr,
                 DOUBLE_QUANT: gl.constexpr):
    """The float32 absmax [BLOCK_N, CHUNKS, 4] of step ``step``'s chunks."""
    code = step * BLOCK_K + chunk_code
    return _absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, blocks_at + code // BLOCKSIZE, mask & (code < K),
                   NESTED_BLOCKSIZE, DOUBLE_QUANT)


@gluon.jit
def _halves(value, LH: gl.constexpr):
    """``value`` [BLOCK_N, CHUNKS, 4] on LH, the same for both halves h."""
    value = gl.convert_layout(value, gl.SliceLayout(3, LH), assert_trivial=True)
    return gl.broadcast(gl.expand_dims(value, 3), gl.full([1, 1, 1, 2], 0, gl.int32, LH))[0]


@gluon.jit
def _decode(w_slot, scale, t, planes, DECODE: gl.constexpr, LD: gl.constexpr, A: gl.constexpr,
            BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, X_DTYPE: gl.constexpr):
    """The MMA's A operand [BLOCK_N, BLOCK_K] in registers from a step's words (ring slot [CHUNKS,
    BLOCK_N, 4]) and their absmax [BLOCK_N, CHUNKS, 4 (t)]."""
    CHUNKS: gl.constexpr = BLOCK_K // 32
    words = gl.expand_dims(w_slot.permute((1, 0, 2)).load(gl.SliceLayout(2, LD)), 2)  # [BLOCK_N, CHUNKS, 1, 4]
    words, _ = gl.broadcast(words, gl.full([1, 1, 4, 1], 0, gl.int32, LD))  # the same words for every t
    w01, w23 = gl.split(gl.reshape(words, [BLOCK_N, CHUNKS, 4, 2, 2]))  # words 0 2 | 1 3
    w0, w2 = gl.split(w01)
    w1, w3 = gl.split(w23)
    # The words' layout is LD's slice in another form (the same registers, checked); LH adds a last
    # axis h in registers: the two elements of a 32-bit pair.
    LH: gl.constexpr = _pair_layout(BLOCK_N, CHUNKS, gl.num_warps())
    l0, l1, l2, l3, h0, h1, h2, h3 = planes
    args = [_halves(w0, LH), _halves(w1, LH), _halves(w2, LH), _halves(w3, LH), _halves(scale, LH), _halves(t, LH),
            _halves(gl.broadcast(l0, t)[0], LH), _halves(gl.broadcast(l1, t)[0], LH),
            _halves(gl.broadcast(l2, t)[0], LH), _halves(gl.broadcast(l3, t)[0], LH),
            _halves(gl.broadcast(h0, t)[0], LH), _halves(gl.broadcast(h1, t)[0], LH),
            _halves(gl.broadcast(h2, t)[0], LH), _halves(gl.broadcast(h3, t)[0], LH)]
    p0, p1, p2, p3 = gl.inline_asm_elementwise(
        DECODE, "=r,=r,=r,=r" + ",r,r" * 4 + ",f,f" + ",r,r" * 9, args, dtype=(X_DTYPE.value,) * 4, is_pure=True,
        pack=2)
    # Pair j of lane t's chunk c: columns 32 c + 8 j + 2 t + h. [BLOCK_N, CHUNKS, 4 (t), 2 (h), j0, j1]
    # -> [BLOCK_N, CHUNKS, j1, j0, 4 (t), 2 (h)] -> [BLOCK_N, BLOCK_K].
    a = gl.join(gl.join(p0, p1), gl.join(p2, p3))
    a = gl.reshape(gl.permute(a, (0, 1, 5, 4, 2, 3)), [BLOCK_N, BLOCK_K])
    return gl.convert_layout(a, A, assert_trivial=True)


@gluon.jit
def linear_wgmma_rs_kernel(
    x_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr, bias_ptr, out_ptr,
    M, N, K,
    BLOCKSIZE: gl.constexpr, NESTED_BLOCKSIZE: gl.constexpr, QUANT_TYPE: gl.constexpr, DOUBLE_QUANT: gl.constexpr,
    HAS_BIAS: gl.constexpr, WEIGHT_DTYPE: gl.constexpr, K_IN_BLOCKS: gl.constexpr, PTX: gl.constexpr,
    BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
    SPLIT_K: gl.constexpr,
):
    NUM_WARPS: gl.constexpr = gl.num_warps()
    CHUNKS: gl.constexpr = BLOCK_K // 32
    X_DTYPE: gl.constexpr = x_ptr.dtype.element_ty
    F16: gl.constexpr = X_DTYPE == gl.float16
    DECODE: gl.constexpr = _DECODE_F16 if F16 else _DECODE_BF16

    LD: gl.constexpr = _word_layout(BLOCK_N, CHUNKS, NUM_WARPS)  # the decode's [BLOCK_N, CHUNKS, 4, 4]
    LS: gl.constexpr = gl.SliceLayout(3, LD)  # [BLOCK_N, CHUNKS, 4 (t)]: a word, an absmax, a lane's t
    LC: gl.constexpr = gl.BlockedLayout([1, 1, 4], [CHUNKS, 32 // CHUNKS, 1], [1, NUM_WARPS, 1], [2, 1, 0])
    LX: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (BLOCK_K // 8), BLOCK_K // 8], [NUM_WARPS, 1], [1, 0])
    ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC, k_width=2)
    X_SHARED: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], X_DTYPE)
    W_SHARED: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])

    n0 = gl.program_id(1) * BLOCK_N
    m0 = gl.program_id(0) * BLOCK_M  # fastest: the programs sharing a weight tile run together
    words_per_row = gl.multiple_of(K // 8, 4)  # K is a multiple of the blocksize, >= 32
    # Copies: chunk c of row r (16 bytes) to w_ring[slot, c, r, :]; x's tile in 16-byte pieces.
    c_rows = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, gl.SliceLayout(2, LC)))[None, :, None]
    c_chunk = gl.arange(0, CHUNKS, layout=gl.SliceLayout(1, gl.SliceLayout(2, LC)))[:, None, None]
    c_word = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, LC)))[None, None, :]
    w_at = c_rows.to(gl.int64) * words_per_row + c_chunk * 4 + c_word
    w_mask = c_rows < N
    w_col = c_chunk * 32  # the chunk's first column
    x_rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, LX))[:, None]
    x_col = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, LX))[None, :]
    x_at = x_rows.to(gl.int64) * K + x_col
    x_mask = x_rows < M
    # The decode: each lane's t, rows and their blocks.
    t = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, LS)))[None, None, :]
    d_rows = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, gl.SliceLayout(2, LS)))[:, None, None]
    d_code = gl.arange(0, CHUNKS, layout=gl.SliceLayout(0, gl.SliceLayout(2, LS)))[None, :, None] * 32
    d_mask = d_rows < N
    blocks_at = d_rows.to(gl.int64) * (K // BLOCKSIZE)
    t = t + 0 * d_code + 0 * d_rows  # [BLOCK_N, CHUNKS, 4]

    planes = _planes(table_ptr, K, 1 if F16 else 2, LS)
    offset = 0.0
    if DOUBLE_QUANT:
        offset = gl.load(offset_ptr)
    words_ptr = packed_ptr.to(gl.pointer_type(gl.int32))

    w_ring = gl.allocate_shared_memory(gl.int32, [STAGES, CHUNKS, BLOCK_N, 4], W_SHARED)
    x_ring = gl.allocate_shared_memory(X_DTYPE, [STAGES, BLOCK_M, BLOCK_K], X_SHARED)
    first, last = _steps(K, BLOCK_K, SPLIT_K)
    for s in gl.static_range(STAGES - 1):
        _copy_step(w_ring.index((first + s) % STAGES), x_ring.index((first + s) % STAGES), words_ptr, w_at, w_mask,
                   w_col, x_ptr, x_at, x_mask, x_col, first + s, K, BLOCK_K)
    absmax = _step_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, blocks_at, d_mask, d_code, first, K, BLOCK_K,
                          BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
    cp.wait_group(STAGES - 2)  # step first has landed
    fence_async_shared()
    gl.thread_barrier()
    a = _decode(w_ring.index(first % STAGES), absmax, t, planes, DECODE, LD, A, BLOCK_N, BLOCK_K, X_DTYPE)
    absmax = _step_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, blocks_at, d_mask, d_code, first + 1, K,
                          BLOCK_K, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)

    # Two steps an iteration, their A operands in two sets of registers: the next step's decode must
    # not write registers that the running MMA reads (ptxas would serialize the MMAs).
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, ACC)
    for step in range(first, last - 1, 2):
        acc = warpgroup_mma(a, x_ring.index(step % STAGES).permute((1, 0)), acc, is_async=True)
        acc, a = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a))  # step - 1's MMA is done
        _next_step(w_ring, x_ring, words_ptr, w_at, w_mask, w_col, x_ptr, x_at, x_mask, x_col, step, K, BLOCK_K, STAGES)
        b = _decode(w_ring.index((step + 1) % STAGES), absmax, t, planes, DECODE, LD, A, BLOCK_N, BLOCK_K, X_DTYPE)
        absmax = _step_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, blocks_at, d_mask, d_code, step + 2, K,
                              BLOCK_K, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
        acc = warpgroup_mma(b, x_ring.index((step + 1) % STAGES).permute((1, 0)), acc, is_async=True)
        acc, b = warpgroup_mma_wait(num_outstanding=1, deps=(acc, b))  # step's MMA is done
        _next_step(w_ring, x_ring, words_ptr, w_at, w_mask, w_col, x_ptr, x_at, x_mask, x_col, step + 1, K, BLOCK_K,
                   STAGES)
        a = _decode(w_ring.index((step + 2) % STAGES), absmax, t, planes, DECODE, LD, A, BLOCK_N, BLOCK_K, X_DTYPE)
        absmax = _step_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, blocks_at, d_mask, d_code, step + 3, K,
                              BLOCK_K, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    cp.wait_group(0)  # no copy may land after the program ends
    if (last - first) % 2 == 1:  # an odd number of steps: the last one
        acc = warpgroup_mma(a, x_ring.index((last - 1) % STAGES).permute((1, 0)), acc)

    _store_tile(acc, bias_ptr, out_ptr, M, N, n0, m0, HAS_BIAS, SPLIT_K, BLOCK_N, BLOCK_M, ACC)


def _grid(args, config):
    return (triton.cdiv(args.m, config["BLOCK_M"]), triton.cdiv(args.n, config["BLOCK_N"]), config["SPLIT_K"])


def _run(args, config):
    split_k_run(linear_wgmma_rs_kernel, _grid, "linear_wgmma_rs", args, config)


def _accepts(args):
    return cp_async_refusal(args, "linear_wgmma_rs")


def _allowed(config, blocksize):
    n, m, k, warps, stages = (config[key] for key in ("BLOCK_N", "BLOCK_M", "BLOCK_K", "num_warps", "STAGES"))
    threads = 32 * warps
    # A thread's registers: the accumulator, two steps' A operands and the decode's words.
    registers = n * m // threads + 2 * (n * k // 2) // threads + (n * k // 8) // threads * 4
    shared = stages * (n * k // 2 + m * k * 2)
    return (n % (16 * warps) == 0 and registers <= 208 and shared <= SHARED_MEMORY_LIMIT)


register(Variant(
    name="linear_wgmma_rs",
    family="linear",
    kernel=linear_wgmma_rs_kernel,
    grid=_grid,
    run=_run,
    space={
        "BLOCK_N": (64, 128, 256),
        "BLOCK_M": (16, 32, 64, 128, 256),
        "BLOCK_K": (64, 128),
        "STAGES": (3, 4, 5),
        "SPLIT_K": (1, 2, 4),
        "num_warps": (4, 8),
        "num_stages": (1,),
    },
    default={"BLOCK_N": 128, "BLOCK_M": 128, "BLOCK_K": 64, "STAGES": 4, "SPLIT_K": 1, "num_warps": 8, "num_stages": 1},
    description="fused GEMM (Hopper): register LUT decode straight into the warpgroup MMA's A registers",
    allowed=_allowed,
    min_capability=(9, 0),
    accepts=_accepts,
))
