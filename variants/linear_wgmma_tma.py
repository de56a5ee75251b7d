"""linear_wgmma_tma (session 18 experiment, not kept): ``linear_wgmma_ws`` with x's tiles brought by
TMA (a device-side tensor descriptor in 128 bytes of global scratch a program, so it sets Triton's
allocator) instead of 16 cp.async pieces a producer thread a step. H200, docs/performance.md
session 18: 0.81-0.85x ``linear_wgmma_ws``'s time, still 1.31-1.58x dense at M = 256-4096."""

import triton

from ._registry import SHARED_MEMORY_LIMIT, Variant, VariantUnavailable, register
from .linear_lut_gemm import split_k_run
from .linear_wgmma import _DECODE_BF16, _DECODE_F16, _decode_into, _grid, _planes, _steps, _store_tile, _word_layout, cp_async_refusal
from .linear_wgmma_ws import _absmax_loads, _absmax_value

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait


@gluon.jit
def _w_tiles(n0, N, K, BLOCKSIZE: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, CH: gl.constexpr,
             LW: gl.constexpr):
    GROUPS: gl.constexpr = BLOCK_K // (8 * CH)
    words_per_row = gl.multiple_of(K // 8, 4)
    rows = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, gl.SliceLayout(2, LW)))[:, None, None]
    group = gl.arange(0, GROUPS, layout=gl.SliceLayout(0, gl.SliceLayout(2, LW)))[None, :, None]
    c = gl.arange(0, CH, layout=gl.SliceLayout(0, gl.SliceLayout(1, LW)))[None, None, :]
    w_mask = rows < N
    w_at = rows.to(gl.int64) * words_per_row + group * CH + c
    g_code = group * (8 * CH)
    blocks_at = rows.to(gl.int64) * (K // BLOCKSIZE)
    return w_at, w_mask, g_code, blocks_at


@gluon.jit
def _produce(x_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr, x_bufs, w_bufs, w_ring,
             ready, empty, M, N, K, n0, m0, first, steps,
             BLOCKSIZE: gl.constexpr, NESTED_BLOCKSIZE: gl.constexpr, DOUBLE_QUANT: gl.constexpr,
             BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr, CH: gl.constexpr,
             STAGES: gl.constexpr, BUFFERS: gl.constexpr, PRODUCER_WARPS: gl.constexpr):
    X_DTYPE: gl.constexpr = x_ptr.dtype.element_ty
    F16: gl.constexpr = X_DTYPE == gl.float16
    KIND: gl.constexpr = 1 if F16 else 2
    DECODE: gl.constexpr = _DECODE_F16 if F16 else _DECODE_BF16
    LW: gl.constexpr = _word_layout(BLOCK_K, CH, PRODUCER_WARPS)
    PAIRS_SHARED: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=w_bufs.type.layout.swizzle_byte_width,
                                                      element_bitwidth=32, rank=2)
    x_desc = tma.make_tensor_descriptor(x_ptr, [M, K], [K, 1], [BLOCK_M, BLOCK_K], x_bufs.type.layout)

    w_at, w_mask, g_code, blocks_at = _w_tiles(n0, N, K, BLOCKSIZE, BLOCK_N, BLOCK_K, CH, LW)
    planes = _planes(table_ptr, K, KIND, LW)
    offset = 0.0
    if DOUBLE_QUANT:
        offset = gl.load(offset_ptr)
    words_ptr = packed_ptr.to(gl.pointer_type(gl.int32))

    for s in gl.static_range(STAGES - 1):
        code = (first + s) * BLOCK_K
        cp.async_copy_global_to_shared(w_ring.index(s), words_ptr + w_at + code // 8, mask=w_mask & (code + g_code < K))
        cp.commit_group()
    absmax = _absmax_value(code2_ptr, _absmax_loads(absmax_ptr, absmax2_ptr, blocks_at, w_mask, g_code, first, K,
                                                    BLOCK_K, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT),
                           offset, DOUBLE_QUANT)
    loads = _absmax_loads(absmax_ptr, absmax2_ptr, blocks_at, w_mask, g_code, first + 1, K, BLOCK_K, BLOCKSIZE,
                          NESTED_BLOCKSIZE, DOUBLE_QUANT)
    for i in range(steps):
        step = first + i
        buffer = i % BUFFERS
        mbarrier.wait(empty.index(buffer), ((i // BUFFERS) & 1) ^ 1)  # the MMA of step - BUFFERS is done
        mbarrier.expect(ready.index(buffer), BLOCK_M * BLOCK_K * X_DTYPE.primitive_bitwidth // 8)
        tma.async_copy_global_to_shared(x_desc, [m0, step * BLOCK_K], ready.index(buffer), x_bufs.index(buffer))
        code = (step + STAGES - 1) * BLOCK_K
        cp.async_copy_global_to_shared(w_ring.index((i + STAGES - 1) % STAGES), words_ptr + w_at + code // 8,
                                       mask=w_mask & (code + g_code < K))
        cp.commit_group()
        later = _absmax_loads(absmax_ptr, absmax2_ptr, blocks_at, w_mask, g_code, step + 2, K, BLOCK_K, BLOCKSIZE,
                              NESTED_BLOCKSIZE, DOUBLE_QUANT)
        cp.wait_group(STAGES - 1)
        _decode_into(w_bufs.index(buffer)._reinterpret(gl.int32, [BLOCK_N, BLOCK_K // 2], PAIRS_SHARED),
                     w_ring.index(i % STAGES).load(LW), absmax, planes, DECODE, BLOCK_N, BLOCK_K)
        absmax = _absmax_value(code2_ptr, loads, offset, DOUBLE_QUANT)
        loads = later
        fence_async_shared()
        gl.thread_barrier()
        mbarrier.arrive(ready.index(buffer))
    cp.wait_group(0)


@gluon.jit
def _consume(x_bufs, w_bufs, ready, empty, bias_ptr, out_ptr, M, N, n0, m0, steps,
             HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
             BUFFERS: gl.constexpr, ACC: gl.constexpr):
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, ACC)
    for i in range(steps):
        buffer = i % BUFFERS
        mbarrier.wait(ready.index(buffer), (i // BUFFERS) & 1)
        acc = warpgroup_mma(w_bufs.index(buffer), x_bufs.index(buffer).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        gl.thread_barrier()
        mbarrier.arrive(empty.index((i + BUFFERS - 1) % BUFFERS), pred=i > 0)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    _store_tile(acc, bias_ptr, out_ptr, M, N, n0, m0, HAS_BIAS, SPLIT_K, BLOCK_N, BLOCK_M, ACC)


@gluon.jit
def linear_wgmma_tma_kernel(
    x_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr, bias_ptr, out_ptr,
    M, N, K,
    BLOCKSIZE: gl.constexpr, NESTED_BLOCKSIZE: gl.constexpr, QUANT_TYPE: gl.constexpr, DOUBLE_QUANT: gl.constexpr,
    HAS_BIAS: gl.constexpr, WEIGHT_DTYPE: gl.constexpr, K_IN_BLOCKS: gl.constexpr, PTX: gl.constexpr,
    BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr, CH: gl.constexpr,
    STAGES: gl.constexpr, BUFFERS: gl.constexpr, SPLIT_K: gl.constexpr, PRODUCER_WARPS: gl.constexpr,
    PRODUCER_REGS: gl.constexpr,
):
    GROUPS: gl.constexpr = BLOCK_K // (8 * CH)
    X_DTYPE: gl.constexpr = x_ptr.dtype.element_ty
    ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    W_SHARED: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], X_DTYPE)
    X_SHARED: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], X_DTYPE)

    n0 = gl.program_id(1) * BLOCK_N
    m0 = gl.program_id(0) * BLOCK_M
    first, last = _steps(K, BLOCK_K, SPLIT_K)
    steps = gl.maximum(last - first, 0)

    w_ring = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, GROUPS, CH], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
    x_bufs = gl.allocate_shared_memory(X_DTYPE, [BUFFERS, BLOCK_M, BLOCK_K], X_SHARED)
    w_bufs = gl.allocate_shared_memory(X_DTYPE, [BUFFERS, BLOCK_N, BLOCK_K], W_SHARED)
    ready = gl.allocate_shared_memory(gl.int64, [BUFFERS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [BUFFERS, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(BUFFERS):
        mbarrier.init(ready.index(b), count=2)  # the x copy's expect and the decoded tile's arrival
        mbarrier.init(empty.index(b), count=1)

    gl.warp_specialize([
        (_consume, (x_bufs, w_bufs, ready, empty, bias_ptr, out_ptr, M, N, n0, m0, steps,
                    HAS_BIAS, SPLIT_K, BLOCK_N, BLOCK_M, BUFFERS, ACC)),
        (_produce, (x_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr, x_bufs, w_bufs,
                    w_ring, ready, empty, M, N, K, n0, m0, first, steps, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT,
                    BLOCK_N, BLOCK_M, BLOCK_K, CH, STAGES, BUFFERS, PRODUCER_WARPS)),
    ], [PRODUCER_WARPS], [PRODUCER_REGS])


def _allocator(size, alignment, stream):
    import torch
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _run(args, config):
    from triton.runtime import _allocation
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_allocator)
    split_k_run(linear_wgmma_tma_kernel, _grid, "linear_wgmma_tma", args, config)


def _accepts(args):
    return cp_async_refusal(args, "linear_wgmma_tma")


def _allowed(config, blocksize):
    n, m, k, warps, cap, producers = (config[key] for key in ("BLOCK_N", "BLOCK_M", "BLOCK_K", "num_warps", "maxnreg",
                                                              "PRODUCER_WARPS"))
    groups = k // (8 * config["CH"])
    producer_words = n * k // 8 // (32 * producers)
    shared = config["STAGES"] * n * k // 2 + config["BUFFERS"] * (m + n) * k * 2
    return (8 * config["CH"] <= blocksize and groups <= 32 and n % (16 * warps) == 0
            and producers * (32 // groups) <= n
            and 32 * (warps + producers) * cap <= 65536
            and n * m // (32 * warps) + 40 <= cap
            and 8 * producer_words + 40 <= config["PRODUCER_REGS"] <= cap
            and shared <= 220 * 1024)


register(Variant(
    name="linear_wgmma_tma",
    family="linear",
    kernel=linear_wgmma_tma_kernel,
    grid=_grid,
    run=_run,
    space={
        "BLOCK_N": (64, 128),
        "BLOCK_M": (64, 128, 256),
        "BLOCK_K": (64, 128),
        "CH": (2, 4),
        "STAGES": (2, 3, 4),
        "BUFFERS": (2, 3, 4),
        "SPLIT_K": (1, 2),
        "PRODUCER_WARPS": (4, 8),
        "PRODUCER_REGS": (80, 96, 152),
        "num_warps": (4, 8),
        "maxnreg": (168,),
        "num_stages": (1,),
    },
    default={"BLOCK_N": 128, "BLOCK_M": 256, "BLOCK_K": 64, "CH": 4, "STAGES": 3, "BUFFERS": 3, "SPLIT_K": 1,
             "PRODUCER_WARPS": 4, "PRODUCER_REGS": 152, "num_warps": 8, "maxnreg": 168, "num_stages": 1},
    description="scratch: ws with x by TMA",
    allowed=_allowed,
    min_capability=(9, 0),
    accepts=_accepts,
))
