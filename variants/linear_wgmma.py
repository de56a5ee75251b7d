"""linear_wgmma: a fused 4-bit GEMM for mid-to-large M whose decode overlaps its tensor-core work
(Hopper warpgroup MMA, Gluon).

``out.T = W @ x.T``: a program owns BLOCK_N weight rows (the MMA's M side, 64-256) and BLOCK_M rows
of x (its N side, 16-256) and walks K in steps of BLOCK_K columns through two shared-memory
buffers:

- the step's packed words are decoded in registers (the PTX ``prmt`` lookup of ``_decode``,
  scaled by their block's absmax in packed 16-bit multiplies: the fused family's tolerance) into
  16-bit x2 words in k order and stored to a buffer in the MMA's swizzled layout, beside x's
  tile of the step;
- the warpgroup MMA of step i is issued asynchronously; once step i - 1's MMA is done, its
  buffer takes step i + 1 (x copied by cp.async, the words decoded) while the tensor cores run,
  and step i + 2's words and absmax are loaded. The tensor cores always have the next MMA queued
  behind the running one. ``linear_lut_gemm`` decodes and multiplies in turns, so its
  decode and MMA times add; here the decode hides under the MMA when the MMA is the longer.

Programs along M are the fastest-varying, so the programs that share a weight tile run together
and read it from DRAM once. Needs rows of whole quantization blocks (K % blocksize == 0), a 16-bit
x and an NVIDIA GPU of compute capability 9.0 (Hopper: ``wgmma``); no interpreter, no AMD.
"""

import triton
import triton.language as tl

from ._decode import _LUT_OFFSET, _LUT_STRIDE
from ._linear import lut_refusal
from .linear_lut_gemm import split_k_run
from .linear_mma_gemv import _absmax, _block_table, _word_pairs
from ._registry import SHARED_MEMORY_LIMIT, Variant, VariantUnavailable, register

try:  # Gluon as this file uses it ships with Triton 3.6
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 6):
        raise ImportError(f"Triton {triton.__version__} is older than 3.6")
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait
except ImportError as exc:
    raise VariantUnavailable(f"linear_wgmma needs Triton 3.6 or newer with Gluon: {exc}") from exc


def _decode_asm(dtype: str) -> str:
    """asm: the 8 codes of a packed word ($4) as four 16-bit x2 words in k order ($0-$3: elements
    0-1, 2-3, 4-5, 6-7, the even element in the low half), times the word's float32 absmax ($5)
    rounded to the 16-bit type, each product rounded once. Byte planes $6-$13."""
    body = ("{\n.reg .b32 s, t, a, b, lo, hi, nz, sc;\nmov.b32 nz, 0x80008000;\ncvt.rn.T.f32 sc, $5, $5;\n"
            + _word_pairs("$4", "sc", ("$0", "$1", "$2", "$3"), first_plane=6) + "}")
    return body.replace(".T", f".{dtype}x2")


_DECODE_BF16, _DECODE_F16 = tl.constexpr(_decode_asm("bf16")), tl.constexpr(_decode_asm("f16"))
# The same four words looked up in a table of the block's own weights (planes $5-$12:
# ``_decode.block_planes``), no multiply.
_DECODE_BLOCK_TABLE = tl.constexpr("{\n.reg .b32 s, t, a, b, lo, hi;\n"
                                   + _word_pairs("$4", None, ("$0", "$1", "$2", "$3"), first_plane=5) + "}")


@gluon.jit
def _copy_step(w_slot, x_slot, words_ptr, w_at, w_mask, g_code, x_ptr, x_at, x_mask, x_col, step, K,
               BLOCK_K: gl.constexpr):
    """Starts the copies of step ``step``'s packed words [BLOCK_N, GROUPS, CH] and x's tile [BLOCK_M,
    BLOCK_K] into ring slots (cp.async, 16-byte pieces; zeros past K and past the rows), one commit
    group."""
    first = step * BLOCK_K  # the step's first column
    cp.async_copy_global_to_shared(w_slot, words_ptr + w_at + first // 8, mask=w_mask & (first + g_code < K))
    cp.async_copy_global_to_shared(x_slot, x_ptr + x_at + first, mask=x_mask & (first + x_col < K))
    cp.commit_group()


@gluon.jit
def _step_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, blocks_at, w_mask, g_code, step, K,
                 BLOCK_K: gl.constexpr, BLOCKSIZE: gl.constexpr, NESTED_BLOCKSIZE: gl.constexpr,
                 DOUBLE_QUANT: gl.constexpr):
    """The float32 absmax [BLOCK_N, GROUPS, 1] of step ``step``'s thread groups of words."""
    code = step * BLOCK_K + g_code  # each group's first code
    return _absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, blocks_at + code // BLOCKSIZE, w_mask & (code < K),
                   NESTED_BLOCKSIZE, DOUBLE_QUANT)


@gluon.jit
def _decode_into(w_buffer, words, absmax, planes, DECODE: gl.constexpr, BLOCK_N: gl.constexpr,
                 BLOCK_K: gl.constexpr, QUANT_TYPE: gl.constexpr = 0, EXACT: gl.constexpr = False):
    """Decodes a step's words into ``w_buffer`` (int32 view [BLOCK_N, BLOCK_K // 2]: 16-bit pairs in
    k order). EXACT (a float16 x on a bfloat16 weight): from a table of each thread group's block
    weights built from ``absmax`` (``_block_table``), not from ``planes``."""
    if EXACT:
        l0, l1, l2, l3, h0, h1, h2, h3 = _block_table(absmax, QUANT_TYPE, True)
        p0, p1, p2, p3 = gl.inline_asm_elementwise(
            _DECODE_BLOCK_TABLE, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r", [words, l0, l1, l2, l3, h0, h1, h2, h3],
            dtype=(gl.int32,) * 4, is_pure=True, pack=1)
    else:
        l0, l1, l2, l3, h0, h1, h2, h3 = planes
        p0, p1, p2, p3 = gl.inline_asm_elementwise(
            DECODE, "=r,=r,=r,=r,r,f,r,r,r,r,r,r,r,r", [words, absmax, l0, l1, l2, l3, h0, h1, h2, h3],
            dtype=(gl.int32,) * 4, is_pure=True, pack=1)
    # [BLOCK_N, GROUPS, CH] x 4 -> [BLOCK_N, GROUPS, CH, 2, 2] (pair 2a + b) -> [BLOCK_N, BLOCK_K // 2]
    pairs = gl.join(gl.join(p0, p2), gl.join(p1, p3))
    w_buffer.store(gl.reshape(pairs, [BLOCK_N, BLOCK_K // 2]))


@gluon.constexpr_function
def _word_layout(block_k, ch, warps):
    """The layout of a step's words [BLOCK_N, GROUPS, CH] on ``warps`` warps: a thread's CH words
    consecutive (one vector load), GROUPS = BLOCK_K // (8 CH) threads a row."""
    groups = block_k // (8 * ch)
    return gl.BlockedLayout([1, 1, ch], [32 // groups, groups, 1], [warps, 1, 1], [2, 1, 0])


@gluon.constexpr_function
def _x_layout(block_k, warps):
    """The layout of x's tile [BLOCK_M, BLOCK_K] on ``warps`` warps, in 16-byte pieces."""
    return gl.BlockedLayout([1, 8], [32 // (block_k // 8), block_k // 8], [warps, 1], [1, 0])


@gluon.jit
def _tiles(n0, m0, M, N, K, BLOCKSIZE: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
           BLOCK_K: gl.constexpr, CH: gl.constexpr, LW: gl.constexpr, LX: gl.constexpr):
    """A program's index tensors: for its words [BLOCK_N, GROUPS, CH] (in layout LW) where they are,
    which rows exist, each thread group's first code and each row's first quantization block; for
    x's tile [BLOCK_M, BLOCK_K] (LX) where it is, which rows exist and each piece's column."""
    GROUPS: gl.constexpr = BLOCK_K // (8 * CH)
    words_per_row = gl.multiple_of(K // 8, 4)  # K is a multiple of the blocksize, >= 32
    rows = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, gl.SliceLayout(2, LW)))[:, None, None]
    group = gl.arange(0, GROUPS, layout=gl.SliceLayout(0, gl.SliceLayout(2, LW)))[None, :, None]
    c = gl.arange(0, CH, layout=gl.SliceLayout(0, gl.SliceLayout(1, LW)))[None, None, :]
    w_mask = rows < N
    w_at = rows.to(gl.int64) * words_per_row + group * CH + c
    g_code = group * (8 * CH)
    blocks_at = rows.to(gl.int64) * (K // BLOCKSIZE)

    x_rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, LX))[:, None]
    x_col = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, LX))[None, :]
    x_at = x_rows.to(gl.int64) * K + x_col
    x_mask = x_rows < M
    return w_at, w_mask, g_code, blocks_at, x_at, x_mask, x_col


@gluon.jit
def _planes(table_ptr, K, KIND: gl.constexpr, LW: gl.constexpr):
    """The LUT's eight byte planes for x's dtype, loaded at a lane-dependent offset (always 0) so
    they stay in registers."""
    lane = gl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [gl.full([1, 1, 1], 0, gl.int32, LW)],
                                     dtype=gl.int32, is_pure=True, pack=1)
    at = table_ptr.to(gl.pointer_type(gl.int32)) + _LUT_OFFSET + KIND * _LUT_STRIDE + (lane & (K >> 31))
    return (gl.load(at), gl.load(at + 1), gl.load(at + 2), gl.load(at + 3),
            gl.load(at + 4), gl.load(at + 5), gl.load(at + 6), gl.load(at + 7))


@gluon.jit
def _steps(K, BLOCK_K: gl.constexpr, SPLIT_K: gl.constexpr):
    """This program's K steps [first, last): all, or its run of them under split-K (the last run may
    be short or empty)."""
    first, last = 0, gl.cdiv(K, BLOCK_K)
    if SPLIT_K > 1:
        run = gl.cdiv(last, SPLIT_K)
        first = gl.program_id(2) * run
        last = gl.minimum(first + run, last)
    return first, last


@gluon.jit
def _store_tile(acc, bias_ptr, out_ptr, M, N, n0, m0, HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr,
                BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, ACC: gl.constexpr):
    """Writes ``acc`` [BLOCK_N, BLOCK_M], out.T's tile, with the bias (or into split-K's float32
    workspace [SPLIT_K, M, N])."""
    out_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ACC))[:, None]
    out_m = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, ACC))[None, :]
    if HAS_BIAS:
        acc += gl.load(bias_ptr + out_n, mask=out_n < N, other=0.0).to(gl.float32)
    if SPLIT_K > 1:
        out_ptr += gl.program_id(2).to(gl.int64) * M * N
    gl.store(out_ptr + out_m.to(gl.int64) * N + out_n, acc.to(out_ptr.dtype.element_ty),
             mask=(out_n < N) & (out_m < M))


@gluon.jit
def linear_wgmma_kernel(
    x_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr, bias_ptr, out_ptr,
    M, N, K,
    BLOCKSIZE: gl.constexpr, NESTED_BLOCKSIZE: gl.constexpr, QUANT_TYPE: gl.constexpr, DOUBLE_QUANT: gl.constexpr,
    HAS_BIAS: gl.constexpr, WEIGHT_DTYPE: gl.constexpr, K_IN_BLOCKS: gl.constexpr, PTX: gl.constexpr,
    BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr, CH: gl.constexpr,
    STAGES: gl.constexpr, SPLIT_K: gl.constexpr,
):
    NUM_WARPS: gl.constexpr = gl.num_warps()
    GROUPS: gl.constexpr = BLOCK_K // (8 * CH)  # a thread's CH consecutive words share one absmax
    X_DTYPE: gl.constexpr = x_ptr.dtype.element_ty
    F16: gl.constexpr = X_DTYPE == gl.float16
    KIND: gl.constexpr = 1 if F16 else 2  # the LUT's byte planes (``_format.LUT_KINDS``)
    DECODE: gl.constexpr = _DECODE_F16 if F16 else _DECODE_BF16
    # A float16 x on a bfloat16 weight: decoded from tables of each block's bfloat16 weights (as
    # ``linear_mma_gemv`` does), since x's float16 grid times the absmax misses them.
    EXACT: gl.constexpr = F16 and WEIGHT_DTYPE == gl.bfloat16

    # Registers: the words and x's tile (``_word_layout``, ``_x_layout``), the accumulator
    # [BLOCK_N, BLOCK_M] (wgmma's).
    LW: gl.constexpr = _word_layout(BLOCK_K, CH, NUM_WARPS)
    LX: gl.constexpr = _x_layout(BLOCK_K, NUM_WARPS)
    ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    W_SHARED: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], X_DTYPE)
    PAIRS_SHARED: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=W_SHARED.swizzle_byte_width,
                                                      element_bitwidth=32, rank=2)
    X_SHARED: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], X_DTYPE)

    n0 = gl.program_id(1) * BLOCK_N
    m0 = gl.program_id(0) * BLOCK_M  # fastest: the programs sharing a weight tile run together
    w_at, w_mask, g_code, blocks_at, x_at, x_mask, x_col = _tiles(n0, m0, M, N, K, BLOCKSIZE, BLOCK_N, BLOCK_M,
                                                                  BLOCK_K, CH, LW, LX)
    planes = _planes(table_ptr, K, KIND, LW)
    offset = 0.0
    if DOUBLE_QUANT:
        offset = gl.load(offset_ptr)
    words_ptr = packed_ptr.to(gl.pointer_type(gl.int32))

    # Rings of STAGES steps for the packed words and x (cp.async), two buffers of decoded weights.
    w_ring = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, GROUPS, CH], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
    x_ring = gl.allocate_shared_memory(X_DTYPE, [STAGES, BLOCK_M, BLOCK_K], X_SHARED)
    w_smem = gl.allocate_shared_memory(X_DTYPE, [2, BLOCK_N, BLOCK_K], W_SHARED)
    first, last = _steps(K, BLOCK_K, SPLIT_K)
    for s in gl.static_range(STAGES - 1):
        _copy_step(w_ring.index((first + s) % STAGES), x_ring.index((first + s) % STAGES), words_ptr, w_at, w_mask,
                   g_code, x_ptr, x_at, x_mask, x_col, first + s, K, BLOCK_K)
    absmax = _step_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, blocks_at, w_mask, g_code, first, K, BLOCK_K,
                          BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
    cp.wait_group(STAGES - 2)  # step 0 has landed (each thread decodes the words it copied)
    _decode_into(w_smem.index(first % 2)._reinterpret(gl.int32, [BLOCK_N, BLOCK_K // 2], PAIRS_SHARED),
                 w_ring.index(first % STAGES).load(LW), absmax, planes, DECODE, BLOCK_N, BLOCK_K, QUANT_TYPE, EXACT)
    absmax = _step_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, blocks_at, w_mask, g_code, first + 1, K, BLOCK_K,
                          BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
    fence_async_shared()
    gl.thread_barrier()

    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, ACC)
    for step in range(first, last):
        acc = warpgroup_mma(w_smem.index(step % 2), x_ring.index(step % STAGES).permute((1, 0)), acc, is_async=True)
        # The previous step's MMA is done (this one runs on): its slots take step + STAGES - 1's
        # copies, and its weight buffer step + 1's decode, while the tensor cores work.
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        gl.thread_barrier()  # ... in every warpgroup
        slot = (step + STAGES - 1) % STAGES
        _copy_step(w_ring.index(slot), x_ring.index(slot), words_ptr, w_at, w_mask, g_code, x_ptr, x_at, x_mask, x_col,
                   step + STAGES - 1, K, BLOCK_K)
        cp.wait_group(STAGES - 2)  # step + 1 has landed
        _decode_into(w_smem.index((step + 1) % 2)._reinterpret(gl.int32, [BLOCK_N, BLOCK_K // 2], PAIRS_SHARED),
                     w_ring.index((step + 1) % STAGES).load(LW), absmax, planes, DECODE, BLOCK_N, BLOCK_K,
                     QUANT_TYPE, EXACT)
        absmax = _step_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, blocks_at, w_mask, g_code, step + 2, K,
                              BLOCK_K, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
        fence_async_shared()
        gl.thread_barrier()
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    cp.wait_group(0)  # the (zero-filling) copies past the last step land before the program ends

    _store_tile(acc, bias_ptr, out_ptr, M, N, n0, m0, HAS_BIAS, SPLIT_K, BLOCK_N, BLOCK_M, ACC)


def _grid(args, config):
    return (triton.cdiv(args.m, config["BLOCK_M"]), triton.cdiv(args.n, config["BLOCK_N"]), config["SPLIT_K"])


def _run(args, config):
    split_k_run(linear_wgmma_kernel, _grid, "linear_wgmma", args, config)


def cp_async_refusal(args, name: str, block_tables: bool = False) -> str | None:
    """Why ``name`` (this variant or its warp-specialized form) cannot take a problem, or None
    (``block_tables``: it decodes a float16 x on a bfloat16 weight from ``_decode.block_planes``)."""
    if args.x2d.data_ptr() % 16:  # cp.async copies 16-byte pieces; Triton cannot build the kernel otherwise
        return (f"{name} copies x in 16-byte pieces and x's data does not start on a 16-byte boundary: "
                "pass a contiguous x of its own (x.clone()) or another variant")
    return lut_refusal(args, name, "multiplies 16-bit weights", block_tables)


def _accepts(args):
    return cp_async_refusal(args, "linear_wgmma", block_tables=True)


def _allowed(config, blocksize):
    n, m, k, warps, stages = (config[key] for key in ("BLOCK_N", "BLOCK_M", "BLOCK_K", "num_warps", "STAGES"))
    threads = 32 * warps
    # A thread's registers: the accumulator, its words' decode (~8 a word) and its x copies' addresses
    # (2 a 16-byte piece); past ~208 ptxas spills to the stack (sm_90, AOT).
    registers = n * m // threads + 8 * (n * k // 8) // threads + 2 * (m * k // 8) // threads
    shared = stages * (n * k // 2 + m * k * 2) + 2 * n * k * 2
    return (8 * config["CH"] <= blocksize and k // (8 * config["CH"]) <= 32 and n % (16 * warps) == 0
            and registers <= 208 and shared <= SHARED_MEMORY_LIMIT)


register(Variant(
    name="linear_wgmma",
    family="linear",
    kernel=linear_wgmma_kernel,
    grid=_grid,
    run=_run,
    space={
        "BLOCK_N": (64, 128, 256),
        "BLOCK_M": (16, 32, 64, 128, 256),
        "BLOCK_K": (64, 128),
        "CH": (2, 4),
        "STAGES": (3, 4),
        "SPLIT_K": (1, 2, 4),
        "num_warps": (4, 8),
        "num_stages": (1,),
    },
    default={"BLOCK_N": 128, "BLOCK_M": 128, "BLOCK_K": 64, "CH": 4, "STAGES": 3, "SPLIT_K": 1, "num_warps": 8, "num_stages": 1},
    description="fused GEMM (Hopper): register LUT decode into shared memory overlapping an async warpgroup MMA",
    allowed=_allowed,
    min_capability=(9, 0),
    accepts=_accepts,
))
