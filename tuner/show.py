"""`nf4-explorer show`: what was tuned on each GPU, and why it won.

One line per problem by default (fits 80 columns); ``--wide`` adds the config, throughput, runner-up
and driver; ``--json`` prints the same as data. An entry the dispatcher would skip is marked with
why, never hidden; an entry tuned with another Triton is marked and still used.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nf4_explorer import tuning


def tuned_files(gpu: str | None) -> list[Path]:
    """Tuned files visible to the dispatcher (first directory first), filtered by slug ('all' = every GPU)."""
    return [path for path in all_files() if gpu in (None, "all") or path.stem == gpu]


def all_files() -> list[Path]:
    seen, files = set(), []
    for _, directory in tuning.search_dirs():
        try:
            paths = sorted(directory.glob("*.json")) if directory.is_dir() else []
        except OSError:
            paths = []
        for path in paths:
            if path.stem not in seen:
                seen.add(path.stem)
                files.append(path)
    return files


def _config_text(config) -> str:
    if not isinstance(config, dict):
        return repr(config)
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in config.items())


_SHORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def problem_text(entry: dict, short: bool = False) -> str:
    m = f"M={entry['m_bucket']} " if tuning.entry_family(entry) == "linear" else ""
    shape = "x".join(map(str, entry["shape"]))
    if short:
        dq = "" if entry["double_quant"] else " f32abs"
        return f"{m}{shape} {entry['quant_type']}/{entry['blocksize']}{dq} {_SHORT_DTYPES.get(entry['out_dtype'], '?')}"
    dq = "dq" if entry["double_quant"] else "fp32-absmax"
    return f"{m}{shape} {entry['quant_type']} bs{entry['blocksize']} {dq} {entry['out_dtype']}"


def status(entry) -> str:
    """'ok', 'ok, tuned with Triton X' (still used), or 'ignored: why'."""
    problem = tuning.entry_problem(entry)
    if problem is not None:
        return f"ignored: {problem}"
    tuned = entry.get("triton_version")
    return f"ok, tuned with Triton {tuned}" if tuned and tuned != tuning.triton_minor() else "ok"


def read(path: Path) -> tuple[dict | None, str | None]:
    """(document, None), or (None, why it cannot be shown)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        return None, f"cannot be read ({exc})"
    problems = tuning.validate_document(doc)
    return (None, "; ".join(problems)) if problems else (doc, None)


def rows(doc: dict) -> list[dict]:
    """One summary per entry (malformed entries included, with their status)."""
    out = []
    for entry in doc["entries"]:
        malformed = tuning.entry_malformed(entry)
        if malformed is not None:
            out.append({"problem": "?", "status": f"ignored: malformed entry ({malformed})", "entry": entry})
            continue
        others = entry.get("others") if isinstance(entry.get("others"), dict) else {}
        timed = {n: o["time_us"] for n, o in others.items() if isinstance(o, dict)
                 and isinstance(o.get("time_us"), (int, float))}
        runner = min(timed.items(), key=lambda kv: kv[1], default=None)
        time_us = entry.get("time_us")
        out.append({
            "problem": problem_text(entry), "short": problem_text(entry, short=True), "family": tuning.entry_family(entry),
            "variant": entry["variant"], "config": entry["config"], "time_us": time_us,
            "gbps": entry.get("gbps"), "pct_of_copy": entry.get("pct_of_copy"),
            "runner_up": runner[0] if runner else None,
            "margin_pct": round(100 * (runner[1] / time_us - 1), 1) if runner and isinstance(time_us, (int, float)) and time_us else None,
            "driver": entry.get("driver"), "trials": entry.get("trials"), "status": status(entry),
        })
    return out


def render(path: Path, console: Console, wide: bool = False) -> dict | None:
    doc, why = read(path)
    if doc is None:
        console.print(f"[red]{path}: {why}[/red]")
        return None
    summary = rows(doc)
    copy = doc.get("copy_bandwidth_gbps")
    if wide:
        title = (f"{doc.get('device_name')} ({path}) | copy bandwidth {copy} GB/s | "
                 f"torch {doc.get('torch_version')}, triton {doc.get('triton_version')}")
        columns = ("problem", "winner", "config", "µs", "GB/s", "% copy", "runner-up", "margin", "driver/trials", "status")
    else:
        title = f"{doc.get('device_name')} ({path.name}, {len(summary)} entries)"
        columns = ("problem", "winner", "µs", "margin", "status")
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, justify="right" if column in ("µs", "GB/s", "% copy", "margin") else "left",
                         no_wrap=not wide, overflow="ellipsis")
    for row in summary:
        color = "green" if row["status"] == "ok" else "yellow"
        if "variant" not in row:
            table.add_row(*(["?"] * (len(columns) - 1)), f"[yellow]{row['status']}[/yellow]")
            continue
        time_text = f"{row['time_us']:.1f}" if isinstance(row["time_us"], (int, float)) else "?"
        margin = f"{row['margin_pct']:.1f}%" if row["margin_pct"] is not None else "-"
        if wide:
            table.add_row(row["problem"], row["variant"], _config_text(row["config"]), time_text,
                          f"{row['gbps'] or 0:.0f}", f"{row['pct_of_copy'] or 0:.1f}", row["runner_up"] or "-", margin,
                          f"{row['driver']}/{row['trials']}", f"[{color}]{row['status']}[/{color}]")
        else:
            table.add_row(row["short"], row["variant"], time_text, margin, f"[{color}]{row['status']}[/{color}]")
    console.print(table)
    return doc


def as_json(paths: list[Path]) -> list[dict]:
    out = []
    for path in paths:
        doc, why = read(path)
        out.append({"file": str(path), "error": why} if doc is None else {
            "file": str(path), "device_name": doc.get("device_name"), "triton_version": doc.get("triton_version"),
            "torch_version": doc.get("torch_version"), "copy_bandwidth_gbps": doc.get("copy_bandwidth_gbps"),
            "entries": [{k: v for k, v in row.items() if k != "short"} for row in rows(doc)],
        })
    return out


def plot(docs: list[dict], path: Path) -> None:
    """One panel per GPU: per tuned dequantize problem, each variant's best GB/s against the
    copy-bandwidth roofline."""
    from .plots import gbps_panels
    from .problems import Problem

    def problem(e):
        return Problem(tuple(e["shape"]), e["out_dtype"], e["blocksize"], e["double_quant"], e["quant_type"])

    panels = []
    for doc in docs:
        entries = [e for e in doc["entries"] if tuning.entry_malformed(e) is None and tuning.entry_family(e) == "dequantize"]
        entries.sort(key=lambda e: (problem(e).bytes_moved(), e["out_dtype"]))  # by size
        names = sorted({e["variant"] for e in entries} | {n for e in entries for n in e.get("others", {})})
        series = {}
        for name in names:
            values = []
            for e in entries:
                time_us = e["time_us"] if e["variant"] == name else e.get("others", {}).get(name, {}).get("time_us")
                values.append(problem(e).bytes_moved() / (time_us * 1e-6) / 1e9 if time_us else 0.0)
            series[name] = values
        title = (f"Best GB/s per variant on {doc.get('device_name')} "
                 f"(torch {doc.get('torch_version')}, triton {doc.get('triton_version')})")
        panels.append(([problem_text(e) for e in entries], series, doc.get("copy_bandwidth_gbps"), title))
    gbps_panels(panels, path)
