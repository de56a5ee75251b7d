"""Charts for `bench --out` and `show --plot` (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def gbps_chart(groups: list[str], series: dict[str, list[float]], roofline: float | None, title: str, path: Path) -> None:
    """GB/s per problem (x, in the given order), one line of markers per series, and the roofline."""
    gbps_panels([(groups, series, roofline, title)], path)


def gbps_panels(panels: list[tuple], path: Path) -> None:
    """One panel per (groups, series, roofline, title), stacked: GB/s per problem (x, in the given
    order), one line of markers per series, and the roofline. Lines, not grouped bars: a panel stays
    readable for 40+ problems and 10 series. A value of 0 (not measured) is left out."""
    plt = _pyplot()
    width = max(8.0, min(20.0, 0.35 * max(len(p[0]) for p in panels) + 4))
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 6 * len(panels)), squeeze=False)
    markers = "os^vD<>ph*xP"
    for ax, (groups, series, roofline, title) in zip(axes[:, 0], panels):
        for i, (name, values) in enumerate(series.items()):
            points = [(x, v) for x, v in enumerate(values) if v > 0]
            ax.plot([x for x, _ in points], [v for _, v in points], marker=markers[i % len(markers)], markersize=4,
                    linewidth=1.0, label=name)
        if roofline:
            ax.axhline(roofline, color="black", linestyle="--", linewidth=1.2, label=f"copy bandwidth {roofline:.0f} GB/s")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("effective bandwidth (GB/s, bytes read + written)")
        ax.set_xlabel("problem (shape, format, output dtype)")
        ax.set_ylim(bottom=0)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_chart(rows, copy_gbps: float, path: Path) -> None:
    import torch
    import triton

    groups = list(dict.fromkeys(r.problem for r in rows))
    # Left to right by bytes moved (the same-bytes copy's rate grows with them).
    copy_rate = {r.problem: r.gbps for r in rows if r.provider == "copy (same bytes)"}
    groups.sort(key=lambda g: copy_rate.get(g, 0.0))
    providers = list(dict.fromkeys(r.provider for r in rows))
    lookup = {(r.problem, r.provider): r.gbps for r in rows}
    series = {p: [lookup.get((g, p), 0.0) for g in groups] for p in providers}
    title = (f"nf4-explorer bench on {torch.cuda.get_device_name()} "
             f"(torch {torch.__version__}, triton {triton.__version__})")
    gbps_chart(groups, series, copy_gbps, title, path)
