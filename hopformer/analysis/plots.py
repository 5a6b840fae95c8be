"""Pictures of graph measures: spectra before and after diffusion, NIP and spectral gap against length.

Needs matplotlib (``pip install hopformer[plot]``); imported only when a function here is called.
Every function returns the matplotlib figure and saves a PNG when ``path`` is given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hopformer.graphs.block_graph import BlockGraph

# One colour per pattern, stable across figures.
COLOURS = {
    "full": "#222222",
    "local": "#8c564b",
    "longformer": "#1f77b4",
    "bigbird": "#2ca02c",
    "diffuser": "#d62728",
    "hypercube": "#9467bd",
}
# Operators drawn in the spectrum panels: (key prefix, colour, marker, label).
SPECTRUM_STYLES = (("A", "#7f7f7f", "o"), ("K", "#1f77b4", "s"), ("exact", "#d62728", "^"))


def _pyplot(saving: bool) -> Any:
    import matplotlib

    if saving:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(figure: Any, path: str | None) -> Any:
    if path is not None:
        figure.tight_layout()
        figure.savefig(path)
        _pyplot(True).close(figure)
    return figure


def _colour(pattern: str, index: int) -> str:
    return COLOURS.get(pattern, f"C{index % 10}")


def plot_spectra(spectra: Mapping[str, Mapping[str, np.ndarray]], path: str | None = None, title: str = "") -> Any:
    """Eigenvalues in the complex plane, one panel per graph.

    ``spectra[label]`` maps an operator name to its eigenvalues, e.g. ``{"A": ..., "K=5": ...,
    "exact PPR": ...}``; names starting with ``A``, ``K`` and ``exact`` get fixed styles. The unit circle
    is drawn; the legend gives ``|lambda_2|`` of each operator.
    """
    plt = _pyplot(path is not None)
    count = len(spectra)
    columns = min(3, count)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 4.0 * rows), dpi=110, squeeze=False)
    circle = np.exp(1j * np.linspace(0, 2 * np.pi, 361))
    for ax, (label, operators) in zip(axes.flat, spectra.items()):
        ax.plot(circle.real, circle.imag, color="#cccccc", linewidth=0.8)
        for index, (name, values) in enumerate(operators.items()):
            colour, marker = next(((c, m) for key, c, m in SPECTRUM_STYLES if name.startswith(key)), (f"C{index}", "."))
            values = np.asarray(values)
            second = np.sort(np.abs(values))[-2] if len(values) > 1 else math.nan
            ax.scatter(
                values.real,
                values.imag,
                s=9,
                color=colour,
                marker=marker,
                alpha=0.6,
                label=f"{name}: |λ2|={second:.3f}",
                linewidths=0,
            )
        ax.set_title(label, fontsize=9)
        ax.set_aspect("equal")
        ax.set_xlim(-1.1, 1.1)
        ax.set_ylim(-1.1, 1.1)
        ax.axhline(0, color="#eeeeee", linewidth=0.5, zorder=0)
        ax.axvline(0, color="#eeeeee", linewidth=0.5, zorder=0)
        ax.legend(fontsize=7, loc="lower left")
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    if title:
        figure.suptitle(title, fontsize=10)
    return _finish(figure, path)


def plot_scaling(
    rows: Sequence[Mapping[str, Any]], path: str | None = None, axes: Sequence[Any] | None = None, hops: int = 5
) -> Any:
    """NIP (log scale) and spectral gap against sequence length, one line per pattern.

    ``rows`` are the measure rows of ``hopformer graph`` (keys ``pattern``, ``seq_len``, ``log10_nip``,
    ``gap``, ``gap_hops``, ``gap_exact``). The gap panel draws ``A`` solid, the ``hops``-step operator
    dotted and exact PPR dashed.
    """
    plt = _pyplot(path is not None)
    figure = None
    if axes is None:
        figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    nip_ax, gap_ax = axes
    patterns = list(dict.fromkeys(row["pattern"] for row in rows))
    for index, pattern in enumerate(patterns):
        mine = sorted((row for row in rows if row["pattern"] == pattern), key=lambda row: row["seq_len"])
        lengths = [row["seq_len"] for row in mine]
        colour = _colour(pattern, index)
        nip_ax.plot(lengths, [row["log10_nip"] for row in mine], "o-", color=colour, label=pattern)
        gap_ax.plot(lengths, [row["gap"] for row in mine], "o-", color=colour, label=f"{pattern}")
        gap_ax.plot(lengths, [row["gap_hops"] for row in mine], ":", color=colour)
        gap_ax.plot(lengths, [row["gap_exact"] for row in mine], "--", color=colour)
    _clip_outliers(nip_ax, rows)
    for ax in (nip_ax, gap_ax):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length L")
        ax.grid(True, alpha=0.3)
    nip_ax.set_ylabel("log10 NIP (higher is better)")
    nip_ax.set_title("Normalized Information Payload")
    gap_ax.set_ylabel("spectral gap 1 - |λ2|")
    gap_ax.set_ylim(-0.02, 1.02)
    gap_ax.set_title(f"spectral gap: A (solid), K={hops} (dotted), exact PPR (dashed)")
    nip_ax.legend(fontsize=8)
    figure = figure or nip_ax.figure
    return _finish(figure, path)


def _clip_outliers(ax: Any, rows: Sequence[Mapping[str, Any]], span: float = 12.0) -> None:
    """Keep the NIP axis readable: a local band's NIP falls exponentially (10^-300 at 16K tokens) and
    would flatten every other curve. Curves below ``span`` decades under the best are cut at the
    axis and labelled with their last value."""
    values = [row["log10_nip"] for row in rows if math.isfinite(row["log10_nip"])]
    if not values:
        return
    top = max(values)
    kept = [value for value in values if value >= top - span]
    bottom = min(kept) - 0.08 * (top - min(kept) + 1)
    if min(values) >= bottom:
        return
    ax.set_ylim(bottom, top + 0.08 * (top - bottom))
    for pattern in dict.fromkeys(row["pattern"] for row in rows):
        mine = sorted((row for row in rows if row["pattern"] == pattern), key=lambda row: row["seq_len"])
        below = [row for row in mine if row["log10_nip"] < bottom]
        if below:
            last = mine[-1]
            first = below[0]
            ax.annotate(
                f"{pattern} off scale: 10^{last['log10_nip']:.0f} at L={last['seq_len']}",
                xy=(first["seq_len"], bottom),
                xytext=(0, 12),
                textcoords="offset points",
                fontsize=7,
                ha="center",
                arrowprops={"arrowstyle": "->", "linewidth": 0.6},
            )


def plot_comparison(
    graphs: Mapping[str, BlockGraph],
    rows: Sequence[Mapping[str, Any]],
    path: str | None = None,
    hops: int = 5,
    title: str = "",
) -> Any:
    """One figure: the patterns' pictures on top, NIP and spectral gap against length below."""
    plt = _pyplot(path is not None)
    count = max(1, len(graphs))
    figure = plt.figure(figsize=(max(11.0, 2.2 * count), 7.6), dpi=110)
    grid = figure.add_gridspec(2, 2 * count, height_ratios=[1, 1.35])
    for index, (label, graph) in enumerate(graphs.items()):
        ax = figure.add_subplot(grid[0, 2 * index : 2 * index + 2])
        graph.plot(ax=ax, max_pixels=256)
        ax.set_title(f"{label}\nL={graph.seq_len}, b={graph.block_size}, density={graph.density:.3f}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("")
        ax.set_ylabel("")
    half = count
    nip_ax = figure.add_subplot(grid[1, :half])
    gap_ax = figure.add_subplot(grid[1, half:])
    plot_scaling(rows, axes=(nip_ax, gap_ax), hops=hops)
    if title:
        figure.suptitle(title, fontsize=10)
    return _finish(figure, path)
