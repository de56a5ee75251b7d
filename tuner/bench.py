"""`nf4-explorer bench`: the dispatcher, every variant, bitsandbytes and the torch reference, timed
in one process beside the card's copy bandwidth."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import torch

import nf4_explorer
from nf4_explorer import tuning

from . import timing
from .problems import Problem


@dataclasses.dataclass
class Row:
    problem: str
    provider: str
    config: str
    us: float
    gbps: float
    pct_copy: float
    speedup_vs_bnb: float | None = None


def _bitsandbytes():
    try:
        import bitsandbytes.functional as bnb_functional
    except Exception:  # not installed, or no library for this CUDA
        return None
    return bnb_functional


def variant_configs(problem: Problem, entries: list[dict], device=None) -> dict[str, dict]:
    """Each variant's tuned config for ``problem`` (from this GPU's tuned ``entries``), else its
    default; with a ``device``, only the variants that run on it."""
    key = tuning.entry_key(problem.key())
    configs = {name: nf4_explorer.get(name).default_config(problem.blocksize) for name in nf4_explorer.names(device)}
    for entry in entries:
        if tuning.entry_key(entry) == key:
            for name, other in entry.get("others", {}).items():
                if name in configs and "config" in other:
                    configs[name] = other["config"]
            configs[entry["variant"]] = entry["config"]
    return configs


def bench(problems: list[Problem], *, device="cuda", torch_reference: bool = True, progress=None) -> tuple[float, list[Row]]:
    """Times every provider on every problem; returns (copy GB/s, rows).

    Each problem's first row is its floor, computed: its bytes at the card's copy bandwidth plus
    the time an empty kernel measures (launch and timing overhead, paid by every kernel)."""
    device = torch.device(device)
    copy_gbps = timing.copy_bandwidth_gbps(device)
    empty_us = timing.empty_launch_us(device)
    bnb = _bitsandbytes()
    _, entries = tuning.load_entries(tuning.device_name(device))
    rows: list[Row] = []
    for problem in problems:
        packed, state = problem.make_inputs(device)
        out = torch.empty(problem.shape, dtype=problem.torch_dtype, device=device)
        reference = nf4_explorer.reference_dequantize(packed, state)
        providers = {"nf4-explorer (dispatcher)": ("", lambda: nf4_explorer.dequantize(packed, state, out=out))}
        for name, config in variant_configs(problem, entries, device).items():
            providers[name] = (
                _config_text(config),
                lambda name=name, config=config: nf4_explorer.dequantize(packed, state, out=out, variant=name, config=config),
            )
        if bnb is not None:
            providers["bitsandbytes"] = ("", lambda: bnb.dequantize_4bit(packed, state))
        # Anchor: a device copy moving the same number of bytes (read + write), timed the same way.
        # It pays the same fixed costs as a kernel of this size (launch, ramp, the L2 flush's
        # write-back), so it is the practical floor at this size.
        copy_src = torch.empty(problem.bytes_moved() // 2, dtype=torch.uint8, device=device)
        copy_dst = torch.empty_like(copy_src)
        if torch_reference:
            providers["torch reference"] = ("", lambda: nf4_explorer.reference_dequantize(packed, state, out=out))
        floor_us = problem.bytes_moved() / (copy_gbps * 1e3) + empty_us
        problem_rows = [
            _row(problem, "floor (copy rate + empty launch)", f"empty kernel {empty_us:.1f} µs", floor_us, copy_gbps),
            _row(problem, "copy (same bytes)", "", timing.median_us(lambda: copy_dst.copy_(copy_src)), copy_gbps),
        ]
        del copy_src, copy_dst
        for provider, (config, fn) in providers.items():
            out.fill_(float("nan"))
            result = fn()
            if not torch.equal(result, reference):
                raise AssertionError(f"{provider} is not bit-exact on {problem.label()}: benchmark aborted")
            problem_rows.append(_row(problem, provider, config, timing.median_us(fn), copy_gbps))
        bnb_us = next((r.us for r in problem_rows if r.provider == "bitsandbytes"), None)
        for row in problem_rows:
            row.speedup_vs_bnb = bnb_us / row.us if bnb_us else None
        rows += problem_rows
        if progress:
            progress(problem)
        del packed, state, out, reference
    return copy_gbps, rows


def _row(problem: Problem, provider: str, config: str, us: float, copy_gbps: float) -> Row:
    gbps = problem.bytes_moved() / (us * 1e-6) / 1e9
    return Row(problem.label(), provider, config, us, gbps, 100 * gbps / copy_gbps)


def loop_comparison(problems: list[Problem], *, device="cuda", repeats: int = 1000, trials: int = 3) -> dict[str, float]:
    """The back-to-back loop: for every problem 3 weight matrices, ``repeats`` rounds of calls,
    one synchronize at the end. Returns wall seconds per provider, the best of ``trials`` runs
    (providers alternate, so a slow spell on the host hits both), and the same calls' GPU time."""
    device = torch.device(device)
    weights = [p.make_inputs(device, seed=seed) for p in problems for seed in range(3)]
    providers = {"nf4-explorer": [lambda w=w: nf4_explorer.dequantize(*w) for w in weights]}
    bnb = _bitsandbytes()
    if bnb is not None:
        providers["bitsandbytes"] = [lambda w=w: bnb.dequantize_4bit(*w) for w in weights]
    results = timing.best_loop_seconds(providers, repeats, trials)
    # The same calls replayed from a CUDA graph: the loop's GPU time, what no host path can beat.
    results["nf4-explorer GPU time (CUDA graph)"] = timing.graph_loop_seconds(providers["nf4-explorer"], repeats)
    return results


def dispatcher_overhead_us(problem: Problem, *, device="cuda", calls: int = 2000, trials: int = 7) -> dict[str, float]:
    """Host cost per call: the dispatcher vs launching the chosen variant with its config directly,
    measured as back-to-back loops of ``calls`` calls (launch-bound on small shapes), the best of
    ``trials`` loops each, alternating: the overhead is a difference of two ~10-25 µs costs, so a
    slow spell on the host must not land on one side only."""
    device = torch.device(device)
    packed, state = problem.make_inputs(device)
    out = torch.empty(problem.shape, dtype=problem.torch_dtype, device=device)
    choice = tuning.explain(packed, state)
    launcher = nf4_explorer.get(choice.variant)
    direct = lambda: launcher.launch(tuning.prepare(packed, state, out), choice.config)
    dispatched = lambda: nf4_explorer.dequantize(packed, state, out=out)
    seconds = timing.best_loop_seconds({"direct": [direct], "dispatcher": [dispatched]}, calls, trials)
    best = {name: total / calls * 1e6 for name, total in seconds.items()}
    best["overhead"] = best["dispatcher"] - best["direct"]
    return best


def _config_text(config: dict) -> str:
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in config.items())


def write_csv(rows: list[Row], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[field.name for field in dataclasses.fields(Row)])
        writer.writeheader()
        for row in rows:
            writer.writerow(dataclasses.asdict(row))


@dataclasses.dataclass
class LinearRow:
    """One linear problem's times (µs, do_bench medians of CUDA-graph replays in one process) for
    every provider; ``uncaptured``: providers that could not be captured, timed as plain calls."""

    problem: str
    m: int
    floor_us: float
    read_us: float  # a kernel that only reads the problem's bytes (timing.read_floor_us)
    times: dict[str, float]
    choice: str
    uncaptured: list[str] = dataclasses.field(default_factory=list)


def linear_bench(problems, *, device="cuda") -> tuple[float, list[LinearRow]]:
    """Times ``nf4_explorer.linear`` (the dispatcher) beside its anchors, in one process: the floor
    (packed weight + absmax + x + output bytes at the card's copy rate), the read floor (a kernel
    that reads as many bytes and does nothing else), bitsandbytes' ``matmul_4bit``
    and its dequantize + ``F.linear``, our dequantize + cuBLAS, and the dense bf16/fp16 weight under
    cuBLAS. Every provider's output is checked first (the fused tolerance; exact for dequantize + cuBLAS).
    Each provider's call is captured in a CUDA graph and its replays timed (:func:`timing.graph_median_us`):
    kernel time, as decoding under CUDA graphs runs it (host time per call: ``bench --loop``, ``bench --e2e``)."""
    device = torch.device(device)
    copy_gbps = timing.copy_bandwidth_gbps(device)
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnb
    except Exception:
        bitsandbytes = bnb = None
    rows = []
    for problem in problems:
        x, packed, state = problem.make_inputs(device)
        reference = tuning.reference_linear(x, packed, state)
        bound = tuning.tolerance(x, packed, state, reference=reference)
        dense_weight = nf4_explorer.dequantize(packed, state).to(x.dtype)
        ours = nf4_explorer.linear(x, packed, state)
        error = (ours.double() - reference).abs().max().item()
        if not error <= bound:
            raise AssertionError(f"{problem.label()}: nf4-explorer's linear is off by {error:.3g}, over the bound {bound:.3g}")
        providers = {
            "nf4-explorer": lambda: nf4_explorer.linear(x, packed, state),
            "nf4-explorer dequantize + cuBLAS": lambda: nf4_explorer.linear(x, packed, state, variant="linear_dequantize"),
            "dense cuBLAS": lambda: torch.nn.functional.linear(x, dense_weight),
        }
        if bnb is not None:
            providers["bitsandbytes matmul_4bit"] = lambda: bitsandbytes.matmul_4bit(x, packed.t(), quant_state=state)
            providers["bitsandbytes dequantize + F.linear"] = (
                lambda: torch.nn.functional.linear(x, bnb.dequantize_4bit(packed, state).to(x.dtype)))
        times, uncaptured = {}, []
        for name, fn in providers.items():
            times[name] = timing.graph_median_us(fn, device=device)
            if times[name] is None:
                uncaptured.append(name)
                times[name] = timing.median_us(fn, device=device)
        floor = problem.bytes_moved() / (copy_gbps * 1e9) * 1e6
        read_us = timing.read_floor_us(problem.bytes_moved(), device)
        choice = tuning.explain_linear(x, packed, state)
        rows.append(LinearRow(problem.weight_problem().label(), problem.m, floor, read_us, times,
                              f"{choice.variant} [{choice.reason}]", uncaptured))
    return copy_gbps, rows
