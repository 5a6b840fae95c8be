"""``hopformer graph``: measure attention patterns and draw them.

    hopformer graph bigbird hypercube --seq-len 1024 4096 --block-size 16 --alpha 0.1 --hops 5 --out figs

prints one row per (pattern, length): density, mean keys per query, node degrees (min/mean/max of the
undirected graph, self-loops excluded), diameter, spectral gap of uniform attention ``A``, of the
``hops``-step diffused operator and of exact PPR, and NIP. With ``--out`` it also writes each pattern's
picture, the spectra before and after diffusion, NIP and spectral gap against length, one comparison
figure, and the measures as JSON (an infinite diameter or log NIP is written as the string ``"inf"`` /
``"-inf"``, since JSON has no infinity).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hopformer.graphs import BlockGraph

# The names of hopformer.graphs.PATTERNS, written out so that `hopformer graph --help` need not import torch
# (a test keeps the two equal).
PATTERN_NAMES = ("bigbird", "diffuser", "full", "grid2d", "hypercube", "local", "longformer")
# Pattern options the verb forwards (to the patterns whose constructor takes them).
PATTERN_OPTIONS = ("window", "num_global", "num_random", "seed", "random_granularity", "side", "radius")
# Largest number of nodes whose full spectrum the spectrum figure computes (dense); beyond, the top 64.
SPECTRUM_FULL_MAX = 1024


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "patterns",
        nargs="+",
        choices=PATTERN_NAMES,
        metavar="PATTERN",
        help=f"attention patterns to measure: {', '.join(PATTERN_NAMES)}",
    )
    parser.add_argument(
        "--seq-len", type=int, nargs="+", default=[1024], metavar="L", help="sequence lengths (default: 1024)"
    )
    parser.add_argument(
        "--block-size", type=int, default=None, help="tokens per block (default: each pattern's own, 64; hypercube 16)"
    )
    parser.add_argument("--alpha", type=float, default=0.1, help="PPR teleport probability (default: 0.1)")
    parser.add_argument("--hops", type=int, default=5, help="diffusion hops of the truncated operator (default: 5)")
    parser.add_argument(
        "--level",
        choices=("token", "block"),
        default=None,
        help="graph the measures run on: one node per token or per block "
        "(default: token for the spectral gap, block for diameter and NIP)",
    )
    parser.add_argument(
        "--no-hub-correction", action="store_true", help="report NIP without the hub-bottleneck correction"
    )
    parser.add_argument("--out", default=None, metavar="DIR", help="write PNG figures and measures.json here")
    parser.add_argument(
        "--spectrum-len",
        type=int,
        default=None,
        metavar="L",
        help="sequence length whose spectra are drawn (one of --seq-len; default: the shortest)",
    )
    options = parser.add_argument_group("pattern options (forwarded to the patterns that take them)")
    options.add_argument("--window", type=int, default=None, help="sliding window in blocks (odd)")
    options.add_argument("--num-global", type=int, default=None, help="global blocks")
    options.add_argument("--num-random", type=int, default=None, help="random key blocks per query block")
    options.add_argument("--seed", type=int, default=None, help="seed of the random parts")
    options.add_argument(
        "--random-granularity",
        choices=("block", "token"),
        default=None,
        help="diffuser: random edges per block or per token",
    )
    options.add_argument("--side", type=int, default=None, help="grid2d: image width in pixels (default: square)")
    options.add_argument("--radius", type=int, default=None, help="grid2d: neighbourhood radius in pixels (1: 3 x 3)")


def run(args: argparse.Namespace) -> int:
    """Build every (pattern, length) graph, print the measures, write the pictures and JSON."""
    from tqdm import tqdm

    from hopformer.analysis.summary import measure_graph
    from hopformer.graphs import PATTERNS, build_graph

    unknown = [pattern for pattern in args.patterns if pattern not in PATTERNS]
    if unknown:
        print(
            f"hopformer graph: unknown pattern(s) {unknown}; choose from {', '.join(sorted(PATTERNS))}", file=sys.stderr
        )
        return 2
    if args.spectrum_len is not None and args.spectrum_len not in args.seq_len:
        print(
            f"hopformer graph: --spectrum-len {args.spectrum_len} must be one of --seq-len {args.seq_len}",
            file=sys.stderr,
        )
        return 2
    spectral_level = args.level or "token"
    nip_level = args.level or "block"
    graphs: dict[tuple[str, int], BlockGraph] = {}
    for pattern in args.patterns:
        options = _pattern_options(pattern, args)
        for seq_len in args.seq_len:
            try:
                graphs[pattern, seq_len] = build_graph(pattern, seq_len, args.block_size, **options)
            except ValueError as error:
                print(f"hopformer graph: {pattern} at --seq-len {seq_len}: {error}", file=sys.stderr)
                return 2
    rows = []
    progress = tqdm(graphs.items(), desc="graphs", disable=len(graphs) < 2, file=sys.stderr)
    for (pattern, seq_len), graph in progress:
        progress.set_postfix_str(f"{pattern} L={seq_len}")
        try:
            hub_correction = not args.no_hub_correction
            rows.append(measure_graph(graph, pattern, args.alpha, args.hops, spectral_level, nip_level, hub_correction))
        except ValueError as error:
            print(f"hopformer graph: {pattern} at --seq-len {seq_len}: {error}", file=sys.stderr)
            return 2
    print(format_table(rows, args.hops, spectral_level, nip_level))
    if args.out:
        written = write_outputs(args.out, graphs, rows, args.alpha, args.hops, spectral_level, args.spectrum_len)
        print(f"wrote {len(written)} files to {args.out}: {', '.join(sorted(os.path.basename(p) for p in written))}")
        if len(written) == 1:
            print("pictures not drawn: matplotlib is missing (pip install 'hopformer[plot]')")
    return 0


def format_table(rows: list[dict[str, Any]], hops: int, spectral_level: str, nip_level: str) -> str:
    """The measures as an aligned text table (also valid Markdown)."""
    header = [
        "pattern",
        "L",
        "block",
        "density",
        "keys/query",
        f"degree min/mean/max ({nip_level})",
        f"diameter ({nip_level})",
        "gap A",
        f"gap K={hops}",
        "gap PPR",
        f"NIP ({nip_level})",
        "seconds",
    ]
    lines = []
    for row in rows:
        diameter = "inf" if not math.isfinite(row["diameter"]) else f"{row['diameter']:.0f}"
        lines.append(
            [
                row["pattern"],
                str(row["seq_len"]),
                str(row["block_size"]),
                f"{row['density']:.4f}",
                f"{row['keys_per_query']:.1f}",
                f"{row['degree_min']:.0f} / {row['mean_degree']:.1f} / {row['degree_max']:.0f}",
                diameter,
                f"{row['gap']:.4f}",
                f"{row['gap_hops']:.4f}",
                f"{row['gap_exact']:.4f}",
                _format_nip(row),
                f"{row['spectral_seconds'] + row['nip_seconds']:.2f}",
            ]
        )
    widths = [max(len(header[i]), *(len(line[i]) for line in lines)) for i in range(len(header))]

    def render(cells: list[str]) -> str:
        return "| " + " | ".join(cell.rjust(width) for cell, width in zip(cells, widths)) + " |"

    title = f"spectral gap at {spectral_level} level (gap = 1 - |lambda_2|)"
    return "\n".join(
        [title, render(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [render(line) for line in lines]
    )


def _format_nip(row: dict[str, Any]) -> str:
    if math.isnan(row["nip"]):
        return "undefined (isolated node)"
    if row["nip"] > 0:
        return f"{row['nip']:.3e}"
    if math.isfinite(row["log10_nip"]):  # underflows as a float; the logarithm is still exact
        return f"10^{row['log10_nip']:.1f}"
    return "0 (disconnected)"


def write_outputs(
    out: str,
    graphs: dict[tuple[str, int], BlockGraph],
    rows: list[dict[str, Any]],
    alpha: float,
    hops: int,
    level: str,
    spectrum_len: int | None = None,
) -> list[str]:
    """``measures.json``, then (with matplotlib) pattern pictures, spectra (at ``spectrum_len``, default the
    shortest length), scaling curves and the comparison figure. Without matplotlib only the JSON is written
    (the caller says so), as ``hopformer bench`` and ``hopformer report`` do."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "measures.json")
    with open(path, "w") as handle:
        json.dump([_json_row(row) for row in rows], handle, indent=1, default=float, allow_nan=False)
    written = [path]
    try:
        import matplotlib  # noqa: F401 (an optional extra: plot)
    except ImportError:
        return written
    from hopformer.analysis import plots

    for (pattern, seq_len), graph in graphs.items():
        path = os.path.join(out, f"pattern_{pattern}_L{seq_len}.png")
        graph.plot(path)
        written.append(path)
    # the full spectrum when it is small enough, else the 64 eigenvalues of largest modulus
    spectrum_len = spectrum_len or min(seq_len for _, seq_len in graphs)
    spectra = {
        f"{pattern} L={seq_len}": _spectra(graph, alpha, hops, level)
        for (pattern, seq_len), graph in graphs.items()
        if seq_len == spectrum_len
    }
    path = os.path.join(out, "spectra.png")
    plots.plot_spectra(spectra, path, title=f"eigenvalues of A, K={hops} and exact PPR (alpha={alpha}), {level} level")
    written.append(path)
    path = os.path.join(out, "scaling.png")
    plots.plot_scaling(rows, path, hops=hops)
    written.append(path)
    pictures = {pattern: graph for (pattern, seq_len), graph in graphs.items() if seq_len == spectrum_len}
    path = os.path.join(out, "graph_comparison.png")
    plots.plot_comparison(pictures, rows, path, hops=hops)
    written.append(path)
    return written


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    """Standard JSON has no infinity or NaN: write them as the strings ``"inf"``, ``"-inf"``, ``"nan"``
    (``float()`` reads them back)."""
    return {
        key: str(value) if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in row.items()
    }


def _spectra(graph: BlockGraph, alpha: float, hops: int, level: str) -> dict[str, Any]:
    from hopformer.analysis.spectral import ppr_spectral_map, spectral_map, spectrum
    from hopformer.ops.coefficients import diffusion_coefficients

    nodes = graph.num_blocks if level == "block" or (not graph.is_causal and graph.block_size > 1) else graph.seq_len
    values = spectrum(graph, None if nodes <= SPECTRUM_FULL_MAX else 64, level=level)
    coefficients = diffusion_coefficients(hops, alpha, remainder="keep")
    return {"A": values, f"K={hops}": spectral_map(values, coefficients), "exact PPR": ppr_spectral_map(values, alpha)}


def _pattern_options(pattern: str, args: argparse.Namespace) -> dict[str, Any]:
    from hopformer.graphs import PATTERNS

    accepted = inspect.signature(PATTERNS[pattern]).parameters
    options, ignored = {}, []
    for name in PATTERN_OPTIONS:
        value = getattr(args, name, None)
        if value is None:
            continue
        if name in accepted:
            options[name] = value
        else:
            ignored.append("--" + name.replace("_", "-"))
    if ignored:
        print(f"hopformer graph: note: {pattern} takes no {', '.join(ignored)}; ignored for it", file=sys.stderr)
    return options
