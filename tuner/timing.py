"""Timing on the GPU: do_bench medians (L2 flushed), back-to-back loops, the copy-bandwidth anchor."""

from __future__ import annotations

import time

import torch
import triton
import triton.language as tl
import triton.testing


def median_us(fn, *, device=None, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time of ``fn()`` in microseconds: triton.testing.do_bench (L2 flushed between runs)
    on a GPU; on the CPU (Triton's interpreter) the wall-clock median of a few runs, which only
    exercises the pipeline and says nothing about a kernel's speed."""
    if device is not None and torch.device(device).type == "cpu":
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e6)
        return sorted(samples)[1]
    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")) * 1000.0


def graph_median_us(fn, *, device=None, warmup_ms: int = 25, rep_ms: int = 100) -> float | None:
    """:func:`median_us` of ``fn`` captured once in a CUDA graph and replayed: the time of its
    kernels alone. Timed as a plain call, a call whose host path outlasts the L2 flush that do_bench
    runs before it reads its host time too (bitsandbytes' small-shape calls: 52-227 µs for kernels
    of ~15-40, docs/performance.md, session 14). None if ``fn`` cannot be captured (it
    synchronizes, or allocates in a way capture refuses)."""
    fn()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:  # torch's capture errors ("operation not permitted when stream is capturing", ...)
        torch.cuda.synchronize(device)
        return None
    return median_us(graph.replay, device=device, warmup_ms=warmup_ms, rep_ms=rep_ms)


def copy_bandwidth_gbps(device, n_bytes: int = 1 << 30) -> float:
    """The card's device-to-device copy bandwidth, GB/s counting bytes read plus bytes written."""
    src = torch.empty(n_bytes // 2, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    us = median_us(lambda: dst.copy_(src))
    del src, dst
    return 2 * (n_bytes // 2) / (us * 1e-6) / 1e9


@triton.jit
def _empty_kernel(x_ptr):
    pass


def empty_launch_us(device) -> float:
    """do_bench median of a kernel that does nothing: the launch and event overhead that every
    kernel's time includes, however few bytes it moves."""
    x = torch.empty(16, device=device)
    _empty_kernel[(1,)](x)
    return median_us(lambda: _empty_kernel[(1,)](x), device=device)


@triton.jit
def _read_kernel(src_ptr, out_ptr, n_words, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Sums CHUNK int32 words of ``src`` per program into ``out[program]``: reads them, nothing else."""
    start = tl.program_id(0).to(tl.int64) * CHUNK
    acc = tl.zeros([BLOCK], tl.int32)
    for offset in range(0, CHUNK, BLOCK):
        at = start + offset + tl.arange(0, BLOCK)
        acc += tl.load(src_ptr + at, mask=at < n_words, other=0)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


# (CHUNK, BLOCK, num_warps) of the read floor: 16-byte loads, 1-8 of them a thread per step.
READ_CONFIGS = [(chunk, block, warps) for chunk in (4096, 16384) for block in (1024, 4096) for warps in (4, 8)]


def read_words(src: torch.Tensor, chunk: int, block: int, num_warps: int) -> torch.Tensor:
    """The sums of ``src`` (int32) per CHUNK words, by :func:`_read_kernel`."""
    out = torch.empty(triton.cdiv(src.numel(), chunk), dtype=torch.int32, device=src.device)
    _read_kernel[(out.numel(),)](src, out, src.numel(), CHUNK=chunk, BLOCK=block, num_warps=num_warps)
    return out


def read_floor_us(n_bytes: int, device) -> float:
    """do_bench median of the fastest of :data:`READ_CONFIGS` of a kernel that only reads ``n_bytes``
    once, launch included: about the least a kernel that must read these bytes takes on this card.
    At tens of MB it is about twice ``n_bytes`` at the copy rate of large copies (H200, 29 MB: 14.3
    against 7.3 µs; docs/performance.md, session 13)."""
    src = torch.zeros(triton.cdiv(n_bytes, 4), dtype=torch.int32, device=device)
    return min(median_us(lambda: read_words(src, *config), device=device) for config in READ_CONFIGS)


def loop_seconds(calls, repeats: int = 1000) -> float:
    """Wall-clock seconds for ``repeats`` rounds of every call in ``calls``, back to back, with one
    synchronize at the end (launch overhead shows here, unlike in do_bench)."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        for call in calls:
            call()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def best_loop_seconds(providers: dict[str, list], repeats: int, trials: int) -> dict[str, float]:
    """The best of ``trials`` :func:`loop_seconds` runs for each provider's calls, the providers
    alternating within each trial, so that a slow spell on the host hits every provider."""
    best = {name: float("inf") for name in providers}
    for _ in range(trials):
        for name, calls in providers.items():
            best[name] = min(best[name], loop_seconds(calls, repeats))
    return best


def graph_loop_seconds(calls, repeats: int = 1000) -> float:
    """Like :func:`loop_seconds`, with one round of ``calls`` captured in a CUDA graph and replayed:
    no host cost per call, so this is the loop's GPU time."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return loop_seconds([graph.replay], repeats)
