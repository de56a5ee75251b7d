"""linear_wgmma_sk: ``linear_wgmma`` in stream-K order, so every multiprocessor gets the same work
(Hopper warpgroup MMA, Gluon).

``linear_wgmma`` gives each program one output tile. At M = 32-128 the Llama MLP's 14336 rows make
224 tiles of 64 rows for 132 multiprocessors: 92 of them run two programs and 40 run one, and the
kernel takes as long as 264 tiles would (H200, session 18: 14336 rows 44.9 µs at M = 64, 16896
rows 46.0, 8448 rows 32.7). Here a persistent grid of PER_SM programs a multiprocessor splits the
flattened (tile, K step) space into equal runs: a program multiplies the K steps of its run with
``linear_wgmma``'s pipelined loop, one ring across tile boundaries (the next tile's copies and first
decode run under the current tile's last MMAs), and writes each piece of a tile (the part of it in
its run) as float32 sums to its own slot of a workspace [programs, PIECES, BLOCK_N, BLOCK_M] (PIECES:
the most tiles a run can touch, ceil(units / programs) // steps + 2). A second kernel adds each tile's pieces in K order (and the
bias) and writes the output once, so the result does not depend on which program ends first.

Needs what ``linear_wgmma`` needs: rows of whole quantization blocks, a 16-bit x whose data starts
on a 16-byte boundary, an NVIDIA GPU of compute capability 9.0.
"""

import functools

import torch
import triton
import triton.language as tl

from ._decode import to_output
from ._format import device_pair_table
from ._launch import KernelArguments, launch
from ._linear import runtime_arguments
from ._registry import SHARED_MEMORY_LIMIT, Variant, VariantUnavailable, register
from .linear_mma_gemv import _absmax
from .linear_wgmma import _DECODE_BF16, _DECODE_F16, _copy_step, _decode_into, _planes, _word_layout, _x_layout, cp_async_refusal

try:  # Gluon as this file uses it ships with Triton 3.6
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 6):
        raise ImportError(f"Triton {triton.__version__} is older than 3.6")
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait
except ImportError as exc:
    raise VariantUnavailable(f"linear_wgmma_sk needs Triton 3.6 or newer with Gluon: {exc}") from exc


@gluon.jit
def _rows(K, BLOCKSIZE: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr,
          CH: gl.constexpr, LW: gl.constexpr, LX: gl.constexpr):
    """A tile's index tensors with no tile offset (``linear_wgmma._tiles`` at n0 = m0 = 0): the weight rows
    [BLOCK_N, 1, 1], each thread's words (LW) and its group's first code, each row's first quantization
    block; x's rows [BLOCK_M, 1], each piece (LX) and its column."""
    GROUPS: gl.constexpr = BLOCK_K // (8 * CH)
    words_per_row = gl.multiple_of(K // 8, 4)  # K is a multiple of the blocksize, >= 32
    w_rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, gl.SliceLayout(2, LW)))[:, None, None]
    group = gl.arange(0, GROUPS, layout=gl.SliceLayout(0, gl.SliceLayout(2, LW)))[None, :, None]
    c = gl.arange(0, CH, layout=gl.SliceLayout(0, gl.SliceLayout(1, LW)))[None, None, :]
    x_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, LX))[:, None]
    x_col = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, LX))[None, :]
    return (w_rows, w_rows.to(gl.int64) * words_per_row + group * CH + c, group * (8 * CH),
            w_rows.to(gl.int64) * (K // BLOCKSIZE), x_rows, x_rows.to(gl.int64) * K + x_col, x_col)


@gluon.jit
def _next(step, tile_m, tile_n, steps, tiles_m):
    """The (step, M tile, N tile) of the unit after this one (K steps fastest, then M tiles)."""
    step += 1
    wrap = (step == steps).to(gl.int32)
    step -= wrap * steps
    tile_m += wrap
    wrap = (tile_m == tiles_m).to(gl.int32)
    return step, tile_m - wrap * tiles_m, tile_n + wrap


@gluon.jit
def _unit(unit, steps, tiles_m):
    """(step, M tile, N tile) of a unit."""
    tile = unit // steps
    return unit - tile * steps, tile % tiles_m, tile // tiles_m


@gluon.jit
def _copy_at(step, tile_m, tile_n, w_slot, x_slot, words_ptr, x_ptr, w_rows, w_at, g_code, x_rows, x_at, x_col,
             M, N, K, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr):
    """``_copy_step`` of a unit, from the tile's offsets and the index tensors of ``_rows``."""
    n0 = tile_n * BLOCK_N
    m0 = tile_m * BLOCK_M
    _copy_step(w_slot, x_slot, words_ptr, w_at + n0.to(gl.int64) * (K // 8), w_rows < N - n0, g_code, x_ptr,
               x_at + m0.to(gl.int64) * K, x_rows < M - m0, x_col, step, K, BLOCK_K)


@gluon.jit
def _absmax_at(step, tile_n, absmax_ptr, code2_ptr, absmax2_ptr, offset, w_rows, blocks_at, g_code, N, K,
               BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, BLOCKSIZE: gl.constexpr,
               NESTED_BLOCKSIZE: gl.constexpr, DOUBLE_QUANT: gl.constexpr):
    """``_step_absmax`` of a unit."""
    n0 = tile_n * BLOCK_N
    code = step * BLOCK_K + g_code
    return _absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset,
                   blocks_at + n0.to(gl.int64) * (K // BLOCKSIZE) + code // BLOCKSIZE, (w_rows < N - n0) & (code < K),
                   NESTED_BLOCKSIZE, DOUBLE_QUANT)


@gluon.jit
def linear_wgmma_sk_kernel(
    x_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr, bias_ptr, out_ptr,
    M, N, K,
    BLOCKSIZE: gl.constexpr, NESTED_BLOCKSIZE: gl.constexpr, QUANT_TYPE: gl.constexpr, DOUBLE_QUANT: gl.constexpr,
    HAS_BIAS: gl.constexpr, WEIGHT_DTYPE: gl.constexpr, K_IN_BLOCKS: gl.constexpr, PTX: gl.constexpr,
    BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr, CH: gl.constexpr,
    STAGES: gl.constexpr, PER_SM: gl.constexpr,
):
    # out_ptr: the float32 workspace [programs, PIECES, BLOCK_N, BLOCK_M] (the bias comes with the sum).
    NUM_WARPS: gl.constexpr = gl.num_warps()
    GROUPS: gl.constexpr = BLOCK_K // (8 * CH)
    X_DTYPE: gl.constexpr = x_ptr.dtype.element_ty
    F16: gl.constexpr = X_DTYPE == gl.float16
    KIND: gl.constexpr = 1 if F16 else 2  # the LUT's byte planes (``_format.LUT_KINDS``)
    DECODE: gl.constexpr = _DECODE_F16 if F16 else _DECODE_BF16
    LW: gl.constexpr = _word_layout(BLOCK_K, CH, NUM_WARPS)
    LX: gl.constexpr = _x_layout(BLOCK_K, NUM_WARPS)
    ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    W_SHARED: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], X_DTYPE)
    PAIRS_SHARED: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=W_SHARED.swizzle_byte_width,
                                                      element_bitwidth=32, rank=2)
    X_SHARED: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], X_DTYPE)

    planes = _planes(table_ptr, K, KIND, LW)
    offset = 0.0
    if DOUBLE_QUANT:
        offset = gl.load(offset_ptr)
    words_ptr = packed_ptr.to(gl.pointer_type(gl.int32))
    w_ring = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, GROUPS, CH], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
    x_ring = gl.allocate_shared_memory(X_DTYPE, [STAGES, BLOCK_M, BLOCK_K], X_SHARED)
    w_smem = gl.allocate_shared_memory(X_DTYPE, [2, BLOCK_N, BLOCK_K], W_SHARED)

    # This program's run [start, end) of the (tile, step) units; tiles along M fastest. One ring
    # runs through the whole run, across tile boundaries: copies STAGES - 1 units ahead, the decode
    # one unit ahead of the MMA, as in linear_wgmma.
    tiles_m = gl.cdiv(M, BLOCK_M)
    steps = gl.cdiv(K, BLOCK_K)
    total = tiles_m * gl.cdiv(N, BLOCK_N) * steps
    program = gl.program_id(0)
    programs = gl.num_programs(0)
    start = (program.to(gl.int64) * total // programs).to(gl.int32)
    end = ((program + 1).to(gl.int64) * total // programs).to(gl.int32)
    pieces = (total + programs - 1) // programs // steps + 2  # the most tiles a run can touch: its slots
    w_rows, w_at, g_code, blocks_at, x_rows, x_at, x_col = _rows(K, BLOCKSIZE, BLOCK_N, BLOCK_M, BLOCK_K, CH, LW, LX)
    inside = (gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ACC))[:, None] * BLOCK_M
              + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, ACC))[None, :])

    # Two cursors walk the run ahead of the MMA without divisions: the copies' (STAGES - 1 units
    # ahead) and the absmax loads' (two ahead).
    c_step, c_m, c_n = _unit(start, steps, tiles_m)
    for s in gl.static_range(STAGES - 1):
        _copy_at(c_step, c_m, c_n, w_ring.index(s), x_ring.index(s), words_ptr, x_ptr, w_rows, w_at, g_code, x_rows,
                 x_at, x_col, M, N, K, BLOCK_N, BLOCK_M, BLOCK_K)
        c_step, c_m, c_n = _next(c_step, c_m, c_n, steps, tiles_m)
    a_step, a_m, a_n = _unit(start, steps, tiles_m)
    absmax = _absmax_at(a_step, a_n, absmax_ptr, code2_ptr, absmax2_ptr, offset, w_rows, blocks_at, g_code, N, K,
                        BLOCK_N, BLOCK_K, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
    cp.wait_group(STAGES - 2)
    _decode_into(w_smem.index(0)._reinterpret(gl.int32, [BLOCK_N, BLOCK_K // 2], PAIRS_SHARED),
                 w_ring.index(0).load(LW), absmax, planes, DECODE, BLOCK_N, BLOCK_K)
    a_step, a_m, a_n = _next(a_step, a_m, a_n, steps, tiles_m)
    absmax = _absmax_at(a_step, a_n, absmax_ptr, code2_ptr, absmax2_ptr, offset, w_rows, blocks_at, g_code, N, K,
                        BLOCK_N, BLOCK_K, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
    a_step, a_m, a_n = _next(a_step, a_m, a_n, steps, tiles_m)
    fence_async_shared()
    gl.thread_barrier()

    i = 0  # units done in this run: the ring's and the decoded buffers' position
    unit = start
    while unit < end:  # the run's pieces, one tile each
        piece_end = gl.minimum(end, (unit // steps + 1) * steps)
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, ACC)
        for _ in range(piece_end - unit):
            acc = warpgroup_mma(w_smem.index(i % 2), x_ring.index(i % STAGES).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            gl.thread_barrier()
            slot = (i + STAGES - 1) % STAGES
            _copy_at(c_step, c_m, c_n, w_ring.index(slot), x_ring.index(slot), words_ptr, x_ptr, w_rows, w_at, g_code,
                     x_rows, x_at, x_col, M, N, K, BLOCK_N, BLOCK_M, BLOCK_K)
            c_step, c_m, c_n = _next(c_step, c_m, c_n, steps, tiles_m)
            cp.wait_group(STAGES - 2)
            _decode_into(w_smem.index((i + 1) % 2)._reinterpret(gl.int32, [BLOCK_N, BLOCK_K // 2], PAIRS_SHARED),
                         w_ring.index((i + 1) % STAGES).load(LW), absmax, planes, DECODE, BLOCK_N, BLOCK_K)
            absmax = _absmax_at(a_step, a_n, absmax_ptr, code2_ptr, absmax2_ptr, offset, w_rows, blocks_at, g_code, N,
                                K, BLOCK_N, BLOCK_K, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
            a_step, a_m, a_n = _next(a_step, a_m, a_n, steps, tiles_m)
            fence_async_shared()
            gl.thread_barrier()
            i += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        piece = program.to(gl.int64) * pieces + (unit // steps - start // steps)
        gl.store(out_ptr + piece * (BLOCK_N * BLOCK_M) + inside, acc)
        unit = piece_end
    cp.wait_group(0)  # the (zero-filling) copies past the run land before the program ends


@triton.jit
def sum_pieces_kernel(part_ptr, bias_ptr, out_ptr, M, N, K, programs,
                      BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    """out's tile ``program_id(0)``: its pieces in the workspace, added in K order (+ bias), cast once."""
    tile = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    steps = tl.cdiv(K, BLOCK_K)
    total = (tiles_m * tl.cdiv(N, BLOCK_N)).to(tl.int64) * steps
    first = tile.to(tl.int64) * steps
    # The programs whose runs hold the tile's first and last steps (a run is [p * total // programs, ...)).
    p_first = ((first + 1) * programs + total - 1) // total - 1
    p_last = ((first + steps) * programs + total - 1) // total - 1
    pieces = (total + programs - 1) // programs // steps + 2  # the most tiles a run can touch: its slots
    inside = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for p in range(p_first, p_last + 1):
        slot = p * pieces + (tile - (p * total // programs) // steps)  # the tile's piece among p's
        acc += tl.load(part_ptr + slot * (BLOCK_N * BLOCK_M) + inside)
    n = (tile // tiles_m) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    m = (tile % tiles_m) * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + m.to(tl.int64) * N + n, to_output(acc, out_ptr), mask=(n < N) & (m < M))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _tiles_of(args, config) -> int:
    return triton.cdiv(args.m, config["BLOCK_M"]) * triton.cdiv(args.n, config["BLOCK_N"])


def _programs(args, config) -> int:
    device = args.device.index if args.device.index is not None else torch.cuda.current_device()
    steps = _tiles_of(args, config) * triton.cdiv(args.k, config["BLOCK_K"])
    return max(1, min(_sm_count(device) * config["PER_SM"], steps))


def _grid(args, config):
    return (_programs(args, config),)


def _run(args, config):
    arguments = args.kernel_arguments()
    programs = _programs(args, config)
    steps = triton.cdiv(args.k, config["BLOCK_K"])
    pieces = triton.cdiv(_tiles_of(args, config) * steps, programs) // steps + 2  # as the kernels count them
    part = torch.empty((programs, pieces, config["BLOCK_N"], config["BLOCK_M"]), dtype=torch.float32,
                       device=args.device)
    table = device_pair_table(args.weight.quant_type, args.device)
    partial = KernelArguments(runtime_arguments(args.x2d, args.weight, table, None, part, args.m, args.n, args.k),
                              {**arguments.constexprs, "HAS_BIAS": False})
    launch(linear_wgmma_sk_kernel, lambda c: (programs,), partial, config, args.device, "linear_wgmma_sk:pieces")
    total = KernelArguments([part, args.bias if args.bias is not None else part, args.out, args.m, args.n, args.k,
                             programs],
                            {"BLOCK_N": config["BLOCK_N"], "BLOCK_M": config["BLOCK_M"], "BLOCK_K": config["BLOCK_K"],
                             "HAS_BIAS": args.bias is not None})
    launch(sum_pieces_kernel, lambda c: (_tiles_of(args, config),), total, {"num_warps": 4}, args.device,
           "linear_wgmma_sk:sum")


def _accepts(args):
    return cp_async_refusal(args, "linear_wgmma_sk")


def _allowed(config, blocksize):
    n, m, k, warps, stages = (config[key] for key in ("BLOCK_N", "BLOCK_M", "BLOCK_K", "num_warps", "STAGES"))
    threads = 32 * warps
    # linear_wgmma's register and shared-memory rules (its _allowed), per program.
    registers = n * m // threads + 8 * (n * k // 8) // threads + 2 * (m * k // 8) // threads
    shared = stages * (n * k // 2 + m * k * 2) + 2 * n * k * 2
    return (8 * config["CH"] <= blocksize and k // (8 * config["CH"]) <= 32 and n % (16 * warps) == 0
            and registers <= 208 and shared <= SHARED_MEMORY_LIMIT)


register(Variant(
    name="linear_wgmma_sk",
    family="linear",
    kernel=linear_wgmma_sk_kernel,
    grid=_grid,
    run=_run,
    space={
        "BLOCK_N": (64, 128),
        "BLOCK_M": (16, 32, 64, 128, 256),
        "BLOCK_K": (64, 128),
        "CH": (2, 4),
        "STAGES": (3, 4),
        "PER_SM": (1, 2, 3, 4),
        "num_warps": (4, 8),
        "num_stages": (1,),
    },
    default={"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_K": 64, "CH": 4, "STAGES": 4, "PER_SM": 3, "num_warps": 4,
             "num_stages": 1},
    description="fused GEMM (Hopper): linear_wgmma in stream-K order (equal runs of (tile, K step) a program) "
                "and a sum of each tile's pieces",
    allowed=_allowed,
    min_capability=(9, 0),
    accepts=_accepts,
))
