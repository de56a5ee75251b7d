"""phase_split: a persistent kernel that reads first and writes second.

Each program (a few per SM) takes one contiguous tile of packed words per round. It first copies the
tile's packed words and absmax words into shared memory with cp.async (the program only reads), then
decodes from shared memory and writes 16-byte vectors (the program only writes). On the H100 the
codes read alone and the output written alone took less time than the two mixed in one kernel
(docs/performance.md, session 2); this kernel separates them in time within each program. It wins
at 12-68 M weights under do_bench, not back to back (docs/performance.md, session 3). Written in
Gluon (Triton's explicit-layout dialect): plain Triton has no explicit shared memory. It needs an NVIDIA GPU of compute capability 8.0 or newer
(cp.async); it does not run in Triton's interpreter or on AMD GPUs.
"""

import functools

import torch
import triton

from ._registry import Variant, VariantUnavailable, register

try:  # Gluon as this file uses it ships with Triton 3.6
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 6):
        raise ImportError(f"Triton {triton.__version__} is older than 3.6")
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
except ImportError as exc:
    raise VariantUnavailable(f"phase_split needs Triton 3.6 or newer with Gluon: {exc}") from exc

SHARED_BYTES_PER_SM = 232448  # the most shared memory one program may take on the H100 (227 KiB)


def _words_per_absmax_word(blocksize: int, double_quant: bool) -> int:
    """Packed 32-bit words (8 codes each) per 32-bit word of absmax: 4 uint8 codes, or 1 float32."""
    return blocksize // 8 * (4 if double_quant else 1)


@gluon.constexpr_function
def _decode_layout(rows, wpa, num_warps):
    """[rows, wpa, 8] (absmax word, packed word, element): lanes along the packed words, 8 outputs
    (16 bytes in half precision) per thread, no element held twice."""
    lanes = min(32, wpa)
    row_lanes = 32 // lanes
    row_warps = max(1, min(num_warps, rows // row_lanes))
    word_warps = num_warps // row_warps
    if rows % (row_lanes * row_warps) or wpa % (lanes * word_warps):
        raise ValueError(f"phase_split: a [{rows}, {wpa}] chunk does not fit {num_warps} warps")
    return gl.BlockedLayout([1, 1, 8], [row_lanes, lanes, 1], [row_warps, word_warps, 1], [2, 1, 0])


@gluon.constexpr_function
def _copy_layout(rows, wpa, num_warps, decode_layout):
    """16-byte cp.async (4 words a thread) where the chunk tiles exactly, else the decode layout's."""
    lanes = wpa // 4
    if wpa % 4 == 0 and 0 < lanes <= 32 and rows % (32 // lanes * num_warps) == 0:
        return gl.BlockedLayout([1, 4], [32 // lanes, lanes], [num_warps, 1], [1, 0])
    return gl.SliceLayout(2, decode_layout)


@gluon.constexpr_function
def shared_budget(chunk, staged):
    """Shared memory bytes a program may use: STAGED chunks of packed words with their double-quant
    blocksize-64 absmax words (1/32 as many), plus 128 bytes for absmax2."""
    return staged * chunk * 4 * 33 // 32 + 128


@gluon.constexpr_function
def _groups_per_tile(staged, chunk, group_words):
    """Nested absmax groups one tile can touch, rounded up to a power of two."""
    return triton.next_power_of_2(staged * chunk // group_words + 2)


@gluon.constexpr_function
def _chunks_that_fit(staged, chunk, rows, group_words, double_quant):
    """How many chunks (with their absmax words) a program stages within its shared_budget: STAGED
    for blocksize-64 double quant, fewer where the absmax takes more room (float32 absmax)."""
    budget = shared_budget(chunk, staged)
    fit = budget // (chunk * 4 + rows * 4)
    while double_quant and fit * (chunk * 4 + rows * 4) + 4 * _groups_per_tile(fit, chunk, group_words) > budget:
        fit -= 1
    return fit


@gluon.jit
def phase_split_kernel(
    packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr, out_ptr,
    n, n_rows, n_cols,
    BLOCKSIZE: gl.constexpr, NESTED_BLOCKSIZE: gl.constexpr, QUANT_TYPE: gl.constexpr,
    DOUBLE_QUANT: gl.constexpr, CHUNK: gl.constexpr, STAGED: gl.constexpr, CTAS_PER_SM: gl.constexpr,
):
    NW: gl.constexpr = gl.num_warps()
    WPA: gl.constexpr = BLOCKSIZE // 8 * (4 if DOUBLE_QUANT else 1)  # packed words per absmax word
    A: gl.constexpr = CHUNK // WPA  # absmax words per chunk
    GROUP_WORDS: gl.constexpr = NESTED_BLOCKSIZE * BLOCKSIZE // 8  # packed words per absmax2 value
    L3: gl.constexpr = _decode_layout(A, WPA, NW)
    L2: gl.constexpr = gl.SliceLayout(2, L3)
    LC: gl.constexpr = _copy_layout(A, WPA, NW, L3)
    FIT: gl.constexpr = _chunks_that_fit(STAGED, CHUNK, A, GROUP_WORDS, DOUBLE_QUANT)  # chunks per round
    codes_smem = gl.allocate_shared_memory(gl.int32, [FIT, A, WPA], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    absmax_smem = gl.allocate_shared_memory(gl.int32, [FIT, A], gl.SwizzledSharedLayout(1, 1, 1, [0]))

    words_ptr = packed_ptr.to(gl.pointer_type(gl.int32))
    absmax_words_ptr = absmax_ptr.to(gl.pointer_type(gl.int32))
    # The main part: whole absmax words of whole packed words. The rest (< 8 * WPA elements) is the
    # tail, done element by element by the last program.
    main_words = (n // (8 * WPA)) * WPA
    n_chunks = gl.cdiv(main_words, CHUNK)
    programs = gl.num_programs(0)
    rounds = gl.cdiv(n_chunks, programs * FIT)
    per_tile = gl.cdiv(n_chunks, programs * gl.maximum(rounds, 1))

    a_idx = gl.arange(0, A, layout=gl.SliceLayout(1, L2))
    w_idx = gl.arange(0, WPA, layout=gl.SliceLayout(0, L2))
    in_chunk = a_idx[:, None] * WPA + w_idx[None, :]
    copy_in_chunk = (gl.arange(0, A, layout=gl.SliceLayout(1, LC))[:, None] * WPA
                     + gl.arange(0, WPA, layout=gl.SliceLayout(0, LC))[None, :])
    # Element j of a word: byte j // 2 (little-endian), high nibble first.
    j = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))
    shifts = ((j // 2) * 8 + (1 - j % 2) * 4)[None, None, :]
    if DOUBLE_QUANT:
        # Phase 1 also pulls the tile's absmax2 values into L1 (through this scratch buffer), so
        # phase 2's per-chunk absmax2 load does not wait on DRAM.
        GROUPS: gl.constexpr = _groups_per_tile(FIT, CHUNK, GROUP_WORDS)
        touch_smem = gl.allocate_shared_memory(gl.float32, [GROUPS], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        g_idx = gl.arange(0, GROUPS, layout=gl.BlockedLayout([1], [32], [NW], [0]))
        offset = gl.load(offset_ptr)
        sub_block = (w_idx // (BLOCKSIZE // 8) * 8)[None, :, None]  # bit offset of a word's absmax code

    for r in range(rounds):
        first = ((r * programs + gl.program_id(0)) * per_tile).to(gl.int64) * CHUNK
        # The last tiles may hold fewer chunks, or none: nothing past the main part is touched.
        tile_chunks = gl.minimum(per_tile, gl.maximum(gl.cdiv(main_words - first, CHUNK), 0).to(gl.int32))
        # Phase 1: reads only.
        for c in range(tile_chunks):
            word = first + c * CHUNK + copy_in_chunk
            cp.async_copy_global_to_shared(codes_smem.index(c), words_ptr + word, mask=word < main_words)
            absmax_word = (first + c * CHUNK) // WPA + a_idx
            cp.async_copy_global_to_shared(absmax_smem.index(c), absmax_words_ptr + absmax_word,
                                           mask=absmax_word < main_words // WPA)
        if DOUBLE_QUANT:
            last = gl.minimum(first + tile_chunks * CHUNK, main_words) - 1
            group = first // GROUP_WORDS + g_idx
            cp.async_copy_global_to_shared(touch_smem, absmax2_ptr + group, mask=group <= last // GROUP_WORDS)
        cp.commit_group()
        cp.wait_group(0)
        gl.thread_barrier()
        # Phase 2: writes only (the loads below hit shared memory and L1).
        for c in range(tile_chunks):
            base = first + c * CHUNK
            word = base + in_chunk
            words = codes_smem.index(c).load(L2)
            codes = (words[:, :, None] >> shifts) & 0xF
            absmax_words = absmax_smem.index(c).load(gl.SliceLayout(1, L2))[:, None, None]
            if DOUBLE_QUANT:
                # CHUNK divides GROUP_WORDS, so a chunk lies in one nested group: one absmax2 value.
                absmax = gl.load(code2_ptr + ((absmax_words >> sub_block) & 0xFF)) * gl.load(
                    absmax2_ptr + base // GROUP_WORDS)
                absmax = absmax + offset
            else:
                absmax = absmax_words.to(gl.float32, bitcast=True)
            values = gl.load(table_ptr + codes) * absmax
            idx = word[:, :, None] * 8 + j[None, None, :]
            gl.store(out_ptr + idx, values.to(out_ptr.dtype.element_ty), mask=(word < main_words)[:, :, None])
        gl.thread_barrier()  # the next round's copies overwrite the buffers

    if gl.program_id(0) == programs - 1:
        TAIL: gl.constexpr = 32 * NW
        for start in range(main_words * 8, n, TAIL):
            e = start + gl.arange(0, TAIL, layout=gl.BlockedLayout([1], [32], [NW], [0])).to(gl.int64)
            mask = e < n
            byte = gl.load(packed_ptr + (e >> 1), mask=mask, other=0).to(gl.int32)
            code = (byte >> (((e & 1) ^ 1).to(gl.int32) * 4)) & 0xF
            block = e // BLOCKSIZE
            if DOUBLE_QUANT:
                q = gl.load(absmax_ptr + block, mask=mask, other=0).to(gl.int32)
                tail_absmax = gl.load(code2_ptr + q) * gl.load(absmax2_ptr + block // NESTED_BLOCKSIZE, mask=mask,
                                                               other=0.0)
                tail_absmax = tail_absmax + gl.load(offset_ptr)
            else:
                tail_absmax = gl.load(absmax_ptr + block, mask=mask, other=0.0)
            value = gl.load(table_ptr + code) * tail_absmax
            gl.store(out_ptr + e, value.to(out_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _grid(args, config):
    wpa = _words_per_absmax_word(args.blocksize, args.double_quant)
    chunks = triton.cdiv((args.n // (8 * wpa)) * wpa, config["CHUNK"])
    programs = _sm_count(args.packed.get_device()) * config["CTAS_PER_SM"]
    return (max(1, min(programs, chunks)),)


def _allowed(config, blocksize):
    chunk = config["CHUNK"]
    return (
        blocksize // 2 <= chunk <= 32 * blocksize  # a chunk holds whole absmax words and lies in one nested group
        and shared_budget(chunk, config["STAGED"]) * config["CTAS_PER_SM"] <= SHARED_BYTES_PER_SM
    )


register(Variant(
    name="phase_split",
    kernel=phase_split_kernel,
    grid=_grid,
    space={
        "CHUNK": (1024, 2048),
        "STAGED": (13, 27, 55),
        "CTAS_PER_SM": (1, 2, 4),
        "num_warps": (4, 8, 16),
    },
    default={"CHUNK": 1024, "STAGED": 13, "CTAS_PER_SM": 4, "num_warps": 8},
    description="persistent Gluon kernel: a tile's codes to shared memory (reads), then decode and write",
    allowed=_allowed,
    min_capability=(8, 0),
))
