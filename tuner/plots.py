"""Charts for `bench --out` and `show --plot` (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def grouped_bars(groups: list[str], series: dict[str, list[float]], roofline: float | None, title: str, path: Path) -> None:
    """One group of bars per problem, one bar per series (GB/s), and the roofline as a line."""
    plt = _pyplot()
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(groups) * max(1, len(series)) * 0.35 + 4), 5.5))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=name)
    if roofline:
        ax.axhline(roofline, color="black", linestyle="--", linewidth=1.2, label=f"copy bandwidth {roofline:.0f} GB/s")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("effective bandwidth (GB/s, bytes read + written)")
    ax.set_xlabel("problem (shape, format, output dtype)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_chart(rows, copy_gbps: float, path: Path) -> None:
    import torch
    import triton

    groups = list(dict.fromkeys(r.problem for r in rows))
    providers = list(dict.fromkeys(r.provider for r in rows))
    lookup = {(r.problem, r.provider): r.gbps for r in rows}
    series = {p: [lookup.get((g, p), 0.0) for g in groups] for p in providers}
    title = (f"nf4-explorer bench on {torch.cuda.get_device_name()} "
             f"(torch {torch.__version__}, triton {triton.__version__})")
    grouped_bars(groups, series, copy_gbps, title, path)
