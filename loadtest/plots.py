"""PNG plots of a run (matplotlib, no display): its timeline and its latency histograms.

Each plot is written beside the run's JSON as `<stem>-<name>.png` and named in its `plots`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from loadtest.stats import percentile

if TYPE_CHECKING:
    from loadtest.context import Ctx

Series = Mapping[str, tuple[Sequence[float], Sequence[float]]]


def timeline(ctx: Ctx, name: str, title: str, keys: list[str], ylabel: str,
             secondary: list[str] | None = None, secondary_label: str = "") -> None:  # fmt: skip
    """Sampled figures of the run (`keys`, optionally more on a right-hand axis) over time."""
    points = ctx.sampler.timeline
    if len(points) < 2:
        return
    xs = [p["t"] for p in points]
    series = {k: (xs, [p.get(k, math.nan) for p in points]) for k in keys}
    more = {k: (xs, [p.get(k, math.nan) for p in points]) for k in secondary or []}
    path = ctx.opts.out / f"{ctx.stem}-{name}.png"
    plot_series(path, title, series, "seconds", ylabel, more, secondary_label)
    ctx.result.plots.append(path.name)


def histogram(ctx: Ctx, name: str, title: str, values: list[float], xlabel: str) -> None:
    if not values:
        return
    path = ctx.opts.out / f"{ctx.stem}-{name}.png"
    plot_histogram(path, title, values, xlabel)
    ctx.result.plots.append(path.name)


def plot_series(
    path: Path,
    title: str,
    series: Series,
    xlabel: str,
    ylabel: str,
    secondary: Series | None = None,
    secondary_label: str = "",
) -> Path:
    """Line plot of named (x, y) series, optionally some on a right-hand axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if secondary:
        right = ax.twinx()
        for name, (xs, ys) in secondary.items():
            right.plot(xs, ys, linestyle="--", label=name)
        right.set_ylabel(secondary_label)
        more_handles, more_labels = right.get_legend_handles_labels()
        handles += more_handles
        labels += more_labels
    if handles:
        ax.legend(handles, labels, loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_histogram(path: Path, title: str, values: Sequence[float], xlabel: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    if values:
        ax.hist(values, bins=60)
        for q, style in ((50, ":"), (99, "--")):
            value = percentile(values, q)
            ax.axvline(value, linestyle=style, color="black", label=f"p{q} {value:.1f}")
        ax.legend(fontsize="small")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
