"""The `nf4-explorer` command line: check, tune, show, bench."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

# Piped output (logs, CI) is not cut to 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)


def _version() -> str:
    """The installed distribution's version (pyproject.toml takes it from nf4_explorer.__version__),
    read without importing torch."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nf4-explorer")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _device():
    import torch

    from nf4_explorer.tuning import interpreter_enabled

    if torch.cuda.is_available():
        return torch.device("cuda")
    if interpreter_enabled():
        return torch.device("cpu")
    return None


def _no_device_message() -> str:
    return (
        "no CUDA GPU found. To run in Triton's interpreter on the CPU (tiny shapes, slow), set "
        "TRITON_INTERPRET=1, e.g.  TRITON_INTERPRET=1 nf4-explorer check"
    )


def _problem_args(parser: argparse.ArgumentParser, default_preset: str) -> None:
    parser.add_argument("--preset", default=None, help=f"problem preset from presets.yaml (default: {default_preset}; "
                        "'tiny' without a GPU)")
    parser.add_argument("--shapes", help="comma-separated ROWSxCOLS shapes, e.g. 4096x14336,1024x4096")
    parser.add_argument("--shapes-file", help="a YAML file of presets (same format as tuner/presets.yaml); "
                        "its first preset unless --preset names another")
    parser.add_argument("--dtypes", help="comma-separated output dtypes: bfloat16,float16,float32")
    parser.add_argument("--blocksizes", help="comma-separated blocksizes, e.g. 64,128")
    parser.add_argument("--double-quant", choices=["on", "off", "both"], help="double-quantized absmax")
    parser.add_argument("--quant-types", help="comma-separated: nf4,fp4")


EXIT_FAILURE = 1  # the command ran and found a failure (a variant not exact, ...)
EXIT_USAGE = 2  # the command could not run as asked: a bad option, file or value (one line, no traceback)
EXIT_INTERRUPTED = 130


class UsageError(ValueError):
    """A mistake in what was asked: printed as one line, exit code EXIT_USAGE."""


def _items(option: str, text: str | None, convert=str) -> list | None:
    """A comma-separated option's values, or None when it is not given; one line naming the option."""
    if text is None:
        return None
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise UsageError(f"{option} {text!r} has an empty item: give comma-separated values")
    try:
        return [convert(item) for item in items]
    except ValueError:
        raise UsageError(f"{option}: {text!r} is not a comma-separated list of {convert.__name__}s") from None


def _narrowing(text: str) -> tuple[str, tuple]:
    """``PARAM=V1,V2`` (``tune --space``) -> (PARAM, values): integers, true/false, or names."""
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise argparse.ArgumentTypeError(f"{text!r}: write PARAM=V1,V2, e.g. SPLIT_K=2,4,8")

    def parse(value: str):
        lowered = value.strip().lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        try:
            return int(value)
        except ValueError:
            return value.strip()

    return key.strip(), tuple(parse(v) for v in values.split(","))


def _positive(kind, *, zero: bool = False):
    """argparse type: a number of ``kind`` above 0 (0 too, with ``zero``)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(f"{text!r} must be {'0 or more' if zero else 'positive'}")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _problems(args, device, default_preset: str):
    from .problems import expand, load_presets, parse_shapes

    try:
        presets = load_presets(args.shapes_file)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    name = args.preset or (default_preset if device is None or device.type == "cuda" else "tiny")
    if args.shapes_file and not args.preset:
        name = next(iter(presets))
    if name not in presets:
        raise UsageError(f"unknown preset {name!r}: choose one of {', '.join(presets)}")
    if args.shapes is not None and not args.shapes.strip():
        raise UsageError("--shapes is empty: give ROWSxCOLS shapes, e.g. --shapes 4096x14336,1024x4096")
    try:
        overrides = {
            "shapes": parse_shapes(args.shapes) if args.shapes else None,
            "dtypes": _items("--dtypes", args.dtypes),
            "blocksizes": _items("--blocksizes", args.blocksizes, int),
            "double_quant": {"on": [True], "off": [False], "both": [True, False]}.get(args.double_quant),
            "quant_types": _items("--quant-types", args.quant_types),
        }
        if overrides["shapes"]:
            overrides["models"] = {}
        return expand(presets[name], **overrides)
    except UsageError:
        raise
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_check(args) -> int:
    """Every variant of both families on bitsandbytes-format weights here: dequantize exact (and equal to
    bitsandbytes' when it is installed), linear within its tolerance; what was skipped and why."""
    import torch

    import nf4_explorer
    from nf4_explorer import tuning
    from .problems import LinearProblem, Problem
    from .timing import median_us

    device = _device()
    if device is None:
        raise UsageError(_no_device_message())
    on_gpu = device.type == "cuda"
    if on_gpu:
        problems = [Problem((4096, 4096), "bfloat16", 64, True, "nf4"), Problem((1023, 4097), "float16", 128, False, "fp4")]
        linear = [LinearProblem((4096, 4096), 1), LinearProblem((4096, 4096), 64, "float16", 128, False, "fp4")]
        _say(args, f"Checking on {torch.cuda.get_device_name(device)}")
    else:
        problems = [Problem((8, 64), "bfloat16", 64, True, "nf4"), Problem((5, 33), "float16", 32, False, "fp4")]
        linear = [LinearProblem((16, 64), 3), LinearProblem((8, 128), 2, "float16", 32, False, "fp4")]
        _say(args, "[yellow]No GPU: running in Triton's interpreter on the CPU, tiny shapes; times are "
                   "interpreter times, not kernel times.[/yellow]")
    try:
        import bitsandbytes.functional as bnb
    except Exception as exc:  # not installed, or no library for this platform
        bnb, bnb_reason = None, f"bitsandbytes not usable here ({type(exc).__name__})"
    results, skipped = [], []
    for name in nf4_explorer.names(family=None):
        reason = nf4_explorer.get(name).unavailable_reason(device)
        if reason is not None:
            skipped.append({"variant": name, "reason": reason})
    if bnb is None:
        skipped.append({"variant": "vs bitsandbytes", "reason": bnb_reason})

    def timed(call):
        start = time.perf_counter()
        call()
        if on_gpu:
            torch.cuda.synchronize()
            return f"{median_us(call):.1f} µs"
        return f"{(time.perf_counter() - start) * 1e3:.0f} ms (interpreter)"

    for problem in problems:
        packed, state = problem.make_inputs(device)
        reference = nf4_explorer.reference_dequantize(packed, state)
        bnb_out = bnb.dequantize_4bit(packed, state) if bnb is not None else None
        for name in nf4_explorer.names(device):
            out = torch.full(problem.shape, float("nan"), dtype=problem.torch_dtype, device=device)
            when = timed(lambda: nf4_explorer.dequantize(packed, state, out=out, variant=name))
            results.append({"problem": problem.label(), "variant": name, "ok": torch.equal(out, reference),
                            "vs_bitsandbytes": None if bnb_out is None else torch.equal(out, bnb_out), "time": when})
    for problem in linear:
        x, packed, state = problem.make_inputs(device)
        reference = tuning.reference_linear(x, packed, state)
        bound = tuning.tolerance(x, packed, state, reference=reference)
        for name in nf4_explorer.names(device, family="linear"):
            refusal = nf4_explorer.get(name).accepts(tuning.prepare_linear(x, packed, state))
            if refusal is not None:
                skipped.append({"variant": f"{name} on {problem.label()}", "reason": refusal})
                continue
            when = timed(lambda: nf4_explorer.linear(x, packed, state, variant=name))
            error = (nf4_explorer.linear(x, packed, state, variant=name).double() - reference).abs().max().item()
            results.append({"problem": problem.label(), "variant": name, "ok": error <= bound, "vs_bitsandbytes": None,
                            "time": when, "error": error, "bound": bound})
    failures = sum((not r["ok"]) + (r["vs_bitsandbytes"] is False) for r in results)
    if args.json:
        print(json.dumps({"results": results, "skipped": skipped, "failures": failures}, indent=2))
        return EXIT_FAILURE if failures else 0
    table = Table(title="nf4-explorer check: every variant at its default config vs the reference")
    for column in ("problem", "variant", "result", "vs bitsandbytes", "time"):
        table.add_column(column)
    for r in results:
        result = ("[green]exact[/green]" if "error" not in r else f"[green]within {r['bound']:.2g}[/green]") if r["ok"] \
            else "[red]FAIL[/red]"
        vs = {None: "-", True: "[green]equal[/green]", False: "[red]DIFFERENT[/red]"}[r["vs_bitsandbytes"]]
        table.add_row(r["problem"], r["variant"], result, vs, r["time"])
    console.print(table)
    for skip in skipped:
        console.print(f"skipped {skip['variant']}: {skip['reason']}")
    console.print("[green]all variants exact[/green] (linear: within the tolerance)" if not failures
                  else f"[red]{failures} failures[/red]")
    return EXIT_FAILURE if failures else 0


def _say(args, text: str) -> None:
    if not getattr(args, "json", False):
        console.print(text)


def cmd_tune(args) -> int:
    import nf4_explorer
    from .tune import tune

    device = _device()
    if device is None:
        console.print(f"[red]error:[/red] {_no_device_message()}")
        return EXIT_USAGE
    if device.type == "cpu":
        note = "No GPU: tuning in Triton's interpreter; the pipeline runs, the times mean nothing."
        if args.json:  # stdout is the JSON document
            print(note, file=sys.stderr)
        else:
            console.print(f"[yellow]{note}[/yellow]")
    problems = _problems(args, device, "llm")
    if args.family == "linear":
        from .problems import linear_problems

        try:
            buckets = [int(m) for m in args.m.split(",")] if args.m else None
            problems = linear_problems(problems, buckets)
        except ValueError as exc:
            console.print(f"[red]error:[/red] {exc}")
            return EXIT_USAGE
    names = args.variants.split(",") if args.variants else nf4_explorer.names(device, family=args.family)
    for name in names:
        if name in nf4_explorer.names(family=None) and nf4_explorer.get(name).family != args.family:
            console.print(f"[red]error:[/red] {name} is a {nf4_explorer.get(name).family} variant; tuning the "
                          f"{args.family} family takes {', '.join(nf4_explorer.names(family=args.family))}")
            return EXIT_USAGE
    try:
        path, entries = tune(problems, names=names, driver=args.driver, trials=args.trials, timeout=args.timeout,
                             storage=args.storage, output_dir=args.output, seed=args.seed, device=device,
                             narrow=dict(args.space),
                             **({} if args.final_rounds is None else {"final_rounds": args.final_rounds}))
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return EXIT_USAGE
    if args.json:
        print(json.dumps({"file": str(path), "problems": len(problems), "entries": entries}, indent=2))
        return 0
    table = Table(title=f"tuned {len(entries)} of {len(problems)} problems ({args.driver}) -> {path}")
    for column in ("problem", "winner", "config", "µs", "GB/s", "% copy"):
        table.add_column(column)
    for entry in entries:
        m = f"M={entry['m_bucket']} " if "m_bucket" in entry else ""
        table.add_row(m + " ".join(str(entry[k]) for k in ("shape", "quant_type", "blocksize", "out_dtype")),
                      entry["variant"], str(entry["config"]), f"{entry['time_us']:.1f}", f"{entry['gbps']:.0f}",
                      str(entry["pct_of_copy"]))
    console.print(table)
    return 0


def cmd_show(args) -> int:
    from nf4_explorer import tuning
    from .show import all_files, as_json, plot, read, render, tuned_files

    gpu, nearest = args.gpu, None
    if gpu is None:
        device = _device()
        gpu = tuning.slug(tuning.device_name(device)) if device is not None and device.type == "cuda" else "all"
        if gpu != "all" and not tuned_files(gpu):
            properties = tuning.device_properties(device)
            nearest = tuning.nearest_file(tuning.device_name(device), *properties) if properties else None
    files = tuned_files(gpu) if nearest is None else [nearest[0]]
    if nearest is not None and not args.json:
        console.print(f"{tuning.device_name(device)} has no tuned file of its own: the dispatcher uses the nearest "
                      f"card's, {nearest[1]} ({nearest[0].name})", highlight=False)
    if not files:
        where = ", ".join(f"{label}: {path}" for label, path in tuning.search_dirs())
        existing = sorted(path.stem for path in all_files())
        known = f"tuned files exist for: {', '.join(existing)}" if existing else "there are no tuned files"
        raise UsageError(f"no tuned file for {gpu!r} (looked in {where}); {known}. Pass --gpu SLUG or 'all', or "
                         "run `nf4-explorer tune` on that GPU")
    if args.json:
        print(json.dumps(as_json(files), indent=2, default=str))
        return 0
    docs = [doc for doc in (render(path, console, wide=args.wide) for path in files) if doc]
    if args.plot:
        target = Path(args.plot)
        if not target.parent.is_dir():
            raise UsageError(f"--plot {args.plot}: the directory {target.parent} does not exist")
        if not docs:
            raise UsageError("--plot: none of the listed files can be read, nothing to plot")
        plot(docs, target)
        console.print(f"wrote {args.plot} ({len(docs)} panel{'s' if len(docs) > 1 else ''}: "
                      f"{', '.join(str(d.get('device_name')) for d in docs)})")
    return 0


def cmd_bench(args) -> int:
    from .bench import bench, dispatcher_overhead_us, loop_comparison, write_csv
    from .problems import expand, load_presets

    device = _device()
    if device is None or device.type != "cuda":
        console.print("[red]error:[/red] bench times kernels on a CUDA GPU; none found here "
                      "(the interpreter's times mean nothing). Run `nf4-explorer check` instead.")
        return EXIT_USAGE
    if args.linear:
        return _bench_linear(args, device)
    if args.e2e:
        return _bench_e2e(args)
    if args.preset or args.shapes or args.shapes_file:
        problems = _problems(args, device, "issue")
    else:
        presets = load_presets()
        problems = list(dict.fromkeys(expand(presets["issue"]) + expand(presets["llm"])))
    copy_gbps, rows = bench(problems, device=device, torch_reference=not args.no_torch)
    if args.json:
        print(json.dumps({"copy_gbps": copy_gbps, "rows": [dataclasses.asdict(r) for r in rows]}, indent=2))
        return 0
    _print_bench(copy_gbps, rows)
    if args.loop:
        from .problems import Problem

        for dtype in ("float16", "bfloat16"):
            loop_problems = [Problem(s, dtype) for s in ((8192, 2048), (4096, 1024), (14336, 4096))]
            result = loop_comparison(loop_problems, device=device)
            line = ", ".join(f"{k}: {v:.3f} s" for k, v in result.items())
            if "bitsandbytes" in result:
                line += f"  (speedup {result['bitsandbytes'] / result['nf4-explorer']:.2f}x)"
            console.print(f"loop ({dtype}, 3 shapes x 3 weights x 1000 calls): {line}")
        for shape in ((4096, 1024), (1024, 4096)):
            cost = dispatcher_overhead_us(Problem(shape, "bfloat16"), device=device)
            console.print(f"dispatcher cost per call, {shape[0]}x{shape[1]} bfloat16: {cost['dispatcher']:.1f} µs "
                          f"vs {cost['direct']:.1f} µs launching the chosen variant directly "
                          f"(overhead {cost['overhead']:.1f} µs)")
    if args.out:
        from .plots import bench_chart

        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_csv(rows, out_dir / "bench.csv")
        bench_chart(rows, copy_gbps, out_dir / "bench.png")
        console.print(f"wrote {out_dir / 'bench.csv'} and {out_dir / 'bench.png'}")
    return 0


def _bench_e2e(args) -> int:
    import torch
    import transformers

    from .e2e import e2e_bench

    rows, checks = e2e_bench(layers=args.layers, new_tokens=args.new_tokens,
                             log=lambda line: console.print(f"[dim]{line}[/dim]"))
    if args.json:
        print(json.dumps({"rows": [dataclasses.asdict(r) for r in rows],
                          "checks": [dataclasses.asdict(c) for c in checks]}, indent=2))
        return 0 if all(c.passed for c in checks) else 1
    table = Table(title=f"end to end, Llama-3-8B shapes ({args.layers} layers; QLoRA 8), NF4 double quant, bf16 | "
                        f"{torch.cuda.get_device_name()} | torch {torch.__version__}, transformers {transformers.__version__}")
    for column in ("measure", "dense bf16", "bitsandbytes NF4", "patched NF4", "patched / bnb"):
        table.add_column(column)
    for row in rows:
        faster = row.patched / row.bitsandbytes if row.unit == "tok/s" else row.bitsandbytes / row.patched
        table.add_row(f"{row.measure} ({row.unit})", f"{row.dense:.1f}", f"{row.bitsandbytes:.1f}",
                      f"{row.patched:.1f}", f"{faster:.2f}x")
    console.print(table)
    check_table = Table(title="checks, patched vs bitsandbytes")
    for column in ("check", "bitsandbytes", "patched", "bound", "passed"):
        check_table.add_column(column)
    for check in checks:
        check_table.add_row(check.check, f"{check.bitsandbytes:.4g}", f"{check.patched:.4g}", check.bound,
                            "yes" if check.passed else "NO")
    console.print(check_table)
    return 0 if all(c.passed for c in checks) else 1


def _bench_linear(args, device) -> int:
    import torch
    import triton

    from .bench import linear_bench
    from .problems import Problem, linear_problems

    if args.preset or args.shapes or args.shapes_file:
        problems = _problems(args, device, "llm")
    else:
        problems = [Problem(shape, dtype) for dtype in ("bfloat16", "float16") for shape in ((14336, 4096), (4096, 14336))]
    try:
        buckets = [int(m) for m in args.m.split(",")] if args.m else [1, 4, 16, 64, 256, 1024, 4096]
        problems = linear_problems(problems, buckets)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return EXIT_USAGE
    copy_gbps, rows = linear_bench(problems, device=device)
    if args.json:
        print(json.dumps({"copy_gbps": copy_gbps, "rows": [dataclasses.asdict(r) for r in rows]}, indent=2))
        return 0
    providers = list(rows[0].times)
    table = Table(title=f"linear, µs (CUDA-graph replays) | {torch.cuda.get_device_name()} | copy {copy_gbps:.0f} GB/s "
                        f"| torch {torch.__version__}, triton {triton.__version__}")
    for column in ("problem", "M", "floor", "read floor", *providers, "x floor", "vs bnb", "runs"):
        table.add_column(column)
    for row in rows:
        ours = row.times["nf4-explorer"]
        bnb = row.times.get("bitsandbytes matmul_4bit")
        table.add_row(row.problem, str(row.m), f"{row.floor_us:.1f}", f"{row.read_us:.1f}",
                      *(f"{row.times[p]:.1f}" for p in providers),
                      f"{ours / row.floor_us:.1f}", f"{bnb / ours:.2f}x" if bnb else "-", row.choice)
    console.print(table)
    for row in rows:
        if row.uncaptured:
            console.print(f"{row.problem} M = {row.m}: {', '.join(row.uncaptured)} could not be captured in a CUDA "
                          "graph, timed as plain calls (host time included)")
    return 0


def _print_bench(copy_gbps: float, rows) -> None:
    import torch
    import triton

    table = Table(title=f"{torch.cuda.get_device_name()} | copy bandwidth {copy_gbps:.0f} GB/s | "
                        f"torch {torch.__version__}, triton {triton.__version__}")
    for column in ("problem", "provider", "µs", "GB/s", "% copy", "vs bnb", "config"):
        table.add_column(column, justify="right" if column in ("µs", "GB/s", "% copy", "vs bnb") else "left")
    last = None
    for row in rows:
        if last is not None and row.problem != last:
            table.add_section()
        last = row.problem
        speedup = f"{row.speedup_vs_bnb:.2f}x" if row.speedup_vs_bnb else "-"
        table.add_row(row.problem, row.provider, f"{row.us:.1f}", f"{row.gbps:.0f}", f"{row.pct_copy:.1f}",
                      speedup, row.config)
    console.print(table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="nf4-explorer",
        description="Bitsandbytes NF4/FP4 weights with tuned Triton kernels: bit-exact dequantization and fused "
                    "4-bit linear layers.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="exactness and time of every variant on this GPU (or the interpreter)")
    check.add_argument("--json", action="store_true", help="print the results as JSON")
    check.set_defaults(func=cmd_check)

    tune = sub.add_parser("tune", help="tune every variant on this GPU and save the winners")
    _problem_args(tune, "llm")
    tune.add_argument("--family", choices=["dequantize", "linear"], default="dequantize",
                      help="kernel family to tune (default dequantize); linear tunes each shape at every M bucket")
    tune.add_argument("--m", help="linear family: comma-separated M buckets (default: 1,2,4,...,4096)")
    tune.add_argument("--variants", help="comma-separated variants of the family (default: all registered)")
    tune.add_argument("--driver", choices=["optuna", "exhaustive"], default="optuna",
                      help="optuna: seeded TPE per (GPU, variant, problem); exhaustive: every config of the space "
                      "(triton.autotune for the dequantize family, the runtime's launcher for linear)")
    tune.add_argument("--space", action="append", type=_narrowing, default=[], metavar="PARAM=V1,V2",
                      help="search PARAM over these values only, in every variant that has it (repeatable), e.g. "
                      "--space SPLIT_K=2,4,8 --space WORDS=16; the entries stay valid for the whole space")
    tune.add_argument("--trials", type=_positive(int), default=16,
                      help="Optuna trials per variant and problem (default 16)")
    tune.add_argument("--timeout", type=_positive(float), help="stop starting new trials after this many seconds")
    tune.add_argument("--storage", help="Optuna storage URL (default: SQLite in the user cache dir); share one "
                      "database between workers, e.g. postgresql://user@host/db")
    tune.add_argument("--output", help="directory for the tuned file (default: the user config dir; "
                      "tuned_configs/ to ship it)")
    tune.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    tune.add_argument("--final-rounds", type=_positive(int, zero=True), metavar="N",
                      help="time the 4 fastest configs of each problem's search N more times, interleaved, and pick "
                      "the winner on their medians (default 3; 0: on the search's own times)")
    tune.add_argument("--json", action="store_true", help="print the new entries as JSON instead of a table")
    tune.set_defaults(func=cmd_tune)

    show = sub.add_parser("show", help="the tuned winners per GPU and their margins")
    show.add_argument("--gpu", help="GPU slug (e.g. nvidia-h100-80gb-hbm3) or 'all' (default: this GPU, else all)")
    show.add_argument("--plot", help="PNG file: each variant's best GB/s per problem against the roofline, one panel per GPU")
    show.add_argument("--wide", action="store_true", help="every column (config, GB/s, runner-up, driver); default: "
                      "one line per problem that fits 80 columns")
    show.add_argument("--json", action="store_true", help="print the tuned entries as JSON")
    show.set_defaults(func=cmd_show)

    bench = sub.add_parser("bench", help="time the dispatcher, every variant, bitsandbytes and torch on a GPU")
    _problem_args(bench, "issue + llm")
    bench.add_argument("--loop", action="store_true", help="also run the back-to-back loop (3 shapes x 3 weights x 1000)")
    bench.add_argument("--out", help="directory for bench.csv and bench.png")
    bench.add_argument("--no-torch", action="store_true", help="skip the (slow) torch reference")
    bench.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    bench.add_argument("--linear", action="store_true", help="the linear family: nf4_explorer.linear per M beside "
                       "bitsandbytes, dequantize + cuBLAS, dense cuBLAS, the floor and the read floor")
    bench.add_argument("--e2e", action="store_true", help="whole Llama-3-8B-shaped models (random weights): decode, "
                       "prefill and a QLoRA step; dense bf16, bitsandbytes NF4 and NF4 patched, in one process")
    bench.add_argument("--layers", type=_positive(int), default=32,
                       help="with --e2e: decoder layers of the decode and prefill model (default 32; QLoRA uses 8)")
    bench.add_argument("--new-tokens", type=_positive(int), default=128,
                       help="with --e2e: tokens each decode generates after its 32-token prompt (default 128)")
    bench.add_argument("--m", help="with --linear: comma-separated M buckets (default 1,4,16,64,256,1024,4096)")
    bench.set_defaults(func=cmd_bench)

    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        console.print(f"interrupted: {_resume_hint(args)}")
        return EXIT_INTERRUPTED
    except (UsageError, ValueError, TypeError, OSError) as exc:
        if args.debug:
            raise
        console.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        return EXIT_USAGE


def _resume_hint(args) -> str:
    if args.command == "tune":
        return ("every finished problem is saved in the tuned file and every finished trial in the Optuna storage; "
                "run the same command again to resume")
    return "nothing was written"


if __name__ == "__main__":
    sys.exit(main())
