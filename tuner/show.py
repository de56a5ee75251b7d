"""`nf4-explorer show`: what was tuned on each GPU, and why it won."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nf4_explorer import tuning


def tuned_files(gpu: str | None) -> list[Path]:
    """Tuned files visible to the dispatcher (first directory first), filtered by slug ('all' = every GPU)."""
    seen, files = set(), []
    for _, directory in tuning.search_dirs():
        for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
            if path.stem in seen or (gpu not in (None, "all") and path.stem != gpu):
                continue
            seen.add(path.stem)
            files.append(path)
    return files


def _config_text(config: dict) -> str:
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in config.items())


def _problem_text(entry: dict) -> str:
    dq = "dq" if entry["double_quant"] else "fp32-absmax"
    return f"{'x'.join(map(str, entry['shape']))} {entry['quant_type']} bs{entry['blocksize']} {dq} {entry['out_dtype']}"


def render(path: Path, console: Console) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        console.print(f"[red]{path}: cannot be read ({exc})[/red]")
        return None
    problems = tuning.validate_document(doc)
    if problems:
        console.print(f"[red]{path}: {'; '.join(problems)}[/red]")
        return None
    copy = doc.get("copy_bandwidth_gbps")
    title = (f"{doc.get('device_name')} ({path.name}) | copy bandwidth {copy} GB/s | "
             f"torch {doc.get('torch_version')}, triton {doc.get('triton_version')}")
    table = Table(title=title)
    for column in ("problem", "winner", "config", "µs", "GB/s", "% copy", "runner-up", "margin", "driver/trials", "status"):
        table.add_column(column, justify="right" if column in ("µs", "GB/s", "% copy", "margin") else "left")
    for entry in doc["entries"]:
        others = entry.get("others", {})
        runner = min(others.items(), key=lambda kv: kv[1]["time_us"], default=None)
        margin = f"{100 * (runner[1]['time_us'] / entry['time_us'] - 1):.1f}%" if runner else "-"
        problem = tuning.entry_problem(entry)
        table.add_row(
            _problem_text(entry), entry["variant"], _config_text(entry["config"]), f"{entry['time_us']:.1f}",
            f"{entry.get('gbps', 0):.0f}", f"{entry.get('pct_of_copy') or 0:.1f}",
            runner[0] if runner else "-", margin, f"{entry.get('driver')}/{entry.get('trials')}",
            "[green]ok[/green]" if problem is None else f"[yellow]ignored: {problem}[/yellow]",
        )
    console.print(table)
    return doc


def plot(doc: dict, path: Path) -> None:
    """Per tuned problem, each variant's best GB/s against the copy-bandwidth roofline."""
    from .plots import gbps_chart
    from .problems import Problem

    def problem(e):
        return Problem(tuple(e["shape"]), e["out_dtype"], e["blocksize"], e["double_quant"], e["quant_type"])

    entries = sorted(doc["entries"], key=lambda e: (problem(e).bytes_moved(), e["out_dtype"]))  # by size
    groups = [_problem_text(e) for e in entries]
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
    gbps_chart(groups, series, doc.get("copy_bandwidth_gbps"), title, path)
