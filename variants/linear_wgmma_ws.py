"""linear_wgmma_ws: ``linear_wgmma`` with its decode and its tensor-core work in different warps
(Hopper warp specialization, Gluon).

``out.T = W @ x.T`` on the same tiles as ``linear_wgmma`` (a program owns BLOCK_N weight rows, the
MMA's M side, and BLOCK_M rows of x, its N side, and walks K in steps of BLOCK_K), split into two
partitions that talk through BUFFERS shared-memory buffers and two mbarriers a buffer:

- the producer, PRODUCER_WARPS warps (one or two warpgroups): waits until a buffer is free, starts the cp.async copy of the
  step's x tile into it (the buffer's ``ready`` barrier tracks the copy: one asynchronous arrival a
  thread), decodes the step's packed words (copied STAGES - 1 steps ahead into a ring of its own;
  their absmax loaded two steps ahead) with ``linear_wgmma``'s register lookup into the buffer's
  weight tile, and arrives on ``ready``;
- the consumer, ``num_warps`` warps (one or two warpgroups): waits on ``ready``, issues the step's
  warpgroup MMA asynchronously, and once the previous step's MMA is done hands that buffer back
  (``empty``). It keeps the accumulator and writes the tile at the end.

In ``linear_wgmma`` the same warps copy, decode and multiply, with three CTA barriers a step; at
large M a step took ~1.2 µs against ~0.56 µs of MMA (docs/performance.md, session 15). Here the
warp schedulers interleave the two partitions, and the producer runs up to BUFFERS steps ahead.
``maxnreg`` (a launch parameter) caps every warp's registers, ptxas builds both partitions under
it, and the producer gives back all but PRODUCER_REGS of them at run time.

Measured (H200, session 16, docs/performance.md): within the contract, but no faster than
``linear_wgmma`` at M = 256-4096 (14336x4096 M = 4096: 1091 µs, dense bf16 683); neither a second
producer warpgroup nor loading the absmax two steps ahead moved it. Nsight Compute: 0.28 issued
instructions a cycle per scheduler, 60% of stalls on L1TEX scoreboards. The tuner keeps it where
it wins; none of its entries ship.

Needs rows of whole quantization blocks (K % blocksize == 0), a 16-bit x whose data starts on a
16-byte boundary and an NVIDIA GPU of compute capability 9.0 (Hopper); no interpreter, no AMD.
"""

import triton

from ._registry import SHARED_MEMORY_LIMIT, Variant, VariantUnavailable, register
from .linear_lut_gemm import split_k_run
from .linear_wgmma import (_DECODE_BF16, _DECODE_F16, _decode_into, _grid, _planes, _steps, _store_tile,
                           _tiles, _word_layout, _x_layout, cp_async_refusal)

try:  # Gluon as this file uses it ships with Triton 3.6
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 6):
        raise ImportError(f"Triton {triton.__version__} is older than 3.6")
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, warpgroup_mma, warpgroup_mma_wait)
except ImportError as exc:
    raise VariantUnavailable(f"linear_wgmma_ws needs Triton 3.6 or newer with Gluon: {exc}") from exc


@gluon.jit
def _absmax_loads(absmax_ptr, absmax2_ptr, blocks_at, w_mask, g_code, step, K, BLOCK_K: gl.constexpr,
                  BLOCKSIZE: gl.constexpr, NESTED_BLOCKSIZE: gl.constexpr, DOUBLE_QUANT: gl.constexpr):
    """The global loads of step ``step``'s absmax [BLOCK_N, GROUPS, 1]: its quantized bytes and their
    nested scale (double quant), or the float32 absmax itself (twice)."""
    code = step * BLOCK_K + g_code  # each group's first code
    block = blocks_at + code // BLOCKSIZE
    mask = w_mask & (code < K)
    if DOUBLE_QUANT:
        q = gl.load(absmax_ptr + block, mask=mask, other=0).to(gl.int32)
        scale = gl.load(absmax2_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
    else:
        scale = gl.load(absmax_ptr + block, mask=mask, other=0.0)
        q = scale
    return q, scale


@gluon.jit
def _absmax_value(code2_ptr, loads, offset, DOUBLE_QUANT: gl.constexpr):
    """The float32 absmax from :func:`_absmax_loads` (``linear_mma_gemv._absmax``'s arithmetic)."""
    q, scale = loads
    if DOUBLE_QUANT:
        absmax = gl.load(code2_ptr + q) * scale
        absmax = absmax + offset
    else:
        absmax = scale
    return absmax


@gluon.jit
def _produce(x_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr, x_bufs, w_bufs, w_ring,
             ready, empty, M, N, K, n0, m0, first, steps,
             BLOCKSIZE: gl.constexpr, NESTED_BLOCKSIZE: gl.constexpr, DOUBLE_QUANT: gl.constexpr,
             BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr, CH: gl.constexpr,
             STAGES: gl.constexpr, BUFFERS: gl.constexpr, PRODUCER_WARPS: gl.constexpr):
    """The producer warps: x's tiles and the decoded weight tiles into the buffers."""
    X_DTYPE: gl.constexpr = x_ptr.dtype.element_ty
    F16: gl.constexpr = X_DTYPE == gl.float16
    KIND: gl.constexpr = 1 if F16 else 2  # the LUT's byte planes (``_format.LUT_KINDS``)
    DECODE: gl.constexpr = _DECODE_F16 if F16 else _DECODE_BF16
    LW: gl.constexpr = _word_layout(BLOCK_K, CH, PRODUCER_WARPS)
    LX: gl.constexpr = _x_layout(BLOCK_K, PRODUCER_WARPS)
    PAIRS_SHARED: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=w_bufs.type.layout.swizzle_byte_width,
                                                      element_bitwidth=32, rank=2)

    w_at, w_mask, g_code, blocks_at, x_at, x_mask, x_col = _tiles(n0, m0, M, N, K, BLOCKSIZE, BLOCK_N, BLOCK_M,
                                                                  BLOCK_K, CH, LW, LX)
    planes = _planes(table_ptr, K, KIND, LW)
    offset = 0.0
    if DOUBLE_QUANT:
        offset = gl.load(offset_ptr)
    words_ptr = packed_ptr.to(gl.pointer_type(gl.int32))

    # The words of the first STAGES - 1 steps, one commit group each (each thread decodes the words
    # it copied: a ring slot is its own again once it has decoded them).
    for s in gl.static_range(STAGES - 1):
        code = (first + s) * BLOCK_K
        cp.async_copy_global_to_shared(w_ring.index(s), words_ptr + w_at + code // 8, mask=w_mask & (code + g_code < K))
        cp.commit_group()
    # The absmax of a step is loaded two steps ahead (a dependent pair of loads: the quantized byte
    # from DRAM, then its code2 entry) and finished one step ahead.
    absmax = _absmax_value(code2_ptr, _absmax_loads(absmax_ptr, absmax2_ptr, blocks_at, w_mask, g_code, first, K,
                                                    BLOCK_K, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT),
                           offset, DOUBLE_QUANT)
    loads = _absmax_loads(absmax_ptr, absmax2_ptr, blocks_at, w_mask, g_code, first + 1, K, BLOCK_K, BLOCKSIZE,
                          NESTED_BLOCKSIZE, DOUBLE_QUANT)
    for i in range(steps):
        step = first + i
        buffer = i % BUFFERS
        mbarrier.wait(empty.index(buffer), ((i // BUFFERS) & 1) ^ 1)  # the MMA of step - BUFFERS is done
        code = step * BLOCK_K
        cp.async_copy_global_to_shared(x_bufs.index(buffer), x_ptr + x_at + code, mask=x_mask & (code + x_col < K))
        cp.mbarrier_arrive(ready.index(buffer), increment_count=False)  # ... when this thread's copies land
        code = (step + STAGES - 1) * BLOCK_K
        cp.async_copy_global_to_shared(w_ring.index((i + STAGES - 1) % STAGES), words_ptr + w_at + code // 8,
                                       mask=w_mask & (code + g_code < K))
        cp.commit_group()
        later = _absmax_loads(absmax_ptr, absmax2_ptr, blocks_at, w_mask, g_code, step + 2, K, BLOCK_K, BLOCKSIZE,
                              NESTED_BLOCKSIZE, DOUBLE_QUANT)
        cp.wait_group(STAGES - 1)  # this step's words have landed
        _decode_into(w_bufs.index(buffer)._reinterpret(gl.int32, [BLOCK_N, BLOCK_K // 2], PAIRS_SHARED),
                     w_ring.index(i % STAGES).load(LW), absmax, planes, DECODE, BLOCK_N, BLOCK_K)
        absmax = _absmax_value(code2_ptr, loads, offset, DOUBLE_QUANT)  # step + 1's
        loads = later
        fence_async_shared()  # the decoded tile, visible to the MMA (async proxy) ...
        gl.thread_barrier()  # ... from every producer thread
        mbarrier.arrive(ready.index(buffer))
    cp.wait_group(0)


@gluon.jit
def _consume(x_bufs, w_bufs, ready, empty, bias_ptr, out_ptr, M, N, n0, m0, steps,
             HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
             BUFFERS: gl.constexpr, ACC: gl.constexpr):
    """The consumer warps: one MMA a step, the output tile at the end."""
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, ACC)
    for i in range(steps):
        buffer = i % BUFFERS
        mbarrier.wait(ready.index(buffer), (i // BUFFERS) & 1)
        fence_async_shared()  # x's tile came by cp.async (generic proxy); the MMA reads it asynchronously
        acc = warpgroup_mma(w_bufs.index(buffer), x_bufs.index(buffer).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        gl.thread_barrier()  # the previous step's MMA is done in every consumer warpgroup: its buffer is free
        mbarrier.arrive(empty.index((i + BUFFERS - 1) % BUFFERS), pred=i > 0)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))

    _store_tile(acc, bias_ptr, out_ptr, M, N, n0, m0, HAS_BIAS, SPLIT_K, BLOCK_N, BLOCK_M, ACC)


@gluon.jit
def linear_wgmma_ws_kernel(
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
    m0 = gl.program_id(0) * BLOCK_M  # fastest: the programs sharing a weight tile run together
    first, last = _steps(K, BLOCK_K, SPLIT_K)
    steps = gl.maximum(last - first, 0)

    w_ring = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, GROUPS, CH], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
    x_bufs = gl.allocate_shared_memory(X_DTYPE, [BUFFERS, BLOCK_M, BLOCK_K], X_SHARED)
    w_bufs = gl.allocate_shared_memory(X_DTYPE, [BUFFERS, BLOCK_N, BLOCK_K], W_SHARED)
    ready = gl.allocate_shared_memory(gl.int64, [BUFFERS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [BUFFERS, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(BUFFERS):
        # ready: one asynchronous arrival a producer thread (its x copies) and the producer's arrival
        mbarrier.init(ready.index(b), count=32 * PRODUCER_WARPS + 1)
        mbarrier.init(empty.index(b), count=1)

    gl.warp_specialize([
        (_consume, (x_bufs, w_bufs, ready, empty, bias_ptr, out_ptr, M, N, n0, m0, steps,
                    HAS_BIAS, SPLIT_K, BLOCK_N, BLOCK_M, BUFFERS, ACC)),
        (_produce, (x_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr, x_bufs, w_bufs,
                    w_ring, ready, empty, M, N, K, n0, m0, first, steps, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT,
                    BLOCK_N, BLOCK_M, BLOCK_K, CH, STAGES, BUFFERS, PRODUCER_WARPS)),
    ], [PRODUCER_WARPS], [PRODUCER_REGS])


def _run(args, config):
    split_k_run(linear_wgmma_ws_kernel, _grid, "linear_wgmma_ws", args, config)


def _accepts(args):
    return cp_async_refusal(args, "linear_wgmma_ws")


def _allowed(config, blocksize):
    n, m, k, warps, cap, producers = (config[key] for key in ("BLOCK_N", "BLOCK_M", "BLOCK_K", "num_warps", "maxnreg",
                                                              "PRODUCER_WARPS"))
    groups = k // (8 * config["CH"])
    # Registers: ptxas builds every partition under maxnreg, and every warp holds that many at launch
    # (65536 a multiprocessor). The consumer's accumulator takes n * m / threads (+ ~40 of
    # addresses and loop state); the producer's words ~8 a word (+ ~48).
    producer_words = n * k // 8 // (32 * producers)
    shared = config["STAGES"] * n * k // 2 + config["BUFFERS"] * (m + n) * k * 2
    return (8 * config["CH"] <= blocksize and groups <= 32 and n % (16 * warps) == 0
            and producers * (32 // groups) <= n
            and 32 * (warps + producers) * cap <= 65536
            and n * m // (32 * warps) + 40 <= cap
            and 8 * producer_words + 48 <= config["PRODUCER_REGS"] <= cap
            and shared <= SHARED_MEMORY_LIMIT)


register(Variant(
    name="linear_wgmma_ws",
    family="linear",
    kernel=linear_wgmma_ws_kernel,
    grid=_grid,
    run=_run,
    space={
        "BLOCK_N": (64, 128),
        "BLOCK_M": (128, 256),
        "BLOCK_K": (64, 128),
        "CH": (4,),
        "STAGES": (3, 4),
        "BUFFERS": (2, 3),
        "SPLIT_K": (1, 2),
        "PRODUCER_WARPS": (4, 8),
        "PRODUCER_REGS": (96, 152),
        "num_warps": (4, 8),
        "maxnreg": (168,),
        "num_stages": (1,),
    },
    default={"BLOCK_N": 128, "BLOCK_M": 256, "BLOCK_K": 64, "CH": 4, "STAGES": 3, "BUFFERS": 3, "SPLIT_K": 1,
             "PRODUCER_WARPS": 4, "PRODUCER_REGS": 152, "num_warps": 8, "maxnreg": 168, "num_stages": 1},
    description="fused GEMM (Hopper, warp-specialized): a decode warpgroup feeds an async warpgroup MMA through mbarriers",
    allowed=_allowed,
    min_capability=(9, 0),
    accepts=_accepts,
))
