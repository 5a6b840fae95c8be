"""``hopformer report``: one comparison table from any run folders, seeds grouped.

    hopformer report runs/pf/bigbird-s* runs/pf/diffuser-hops1-s* runs/pf/diffuser-attn-only
    hopformer report runs/pf/* --out runs/pf          # also report.md, report.json and curves.png there

Runs that differ only in the seed form one row, named by the settings that set it apart; see
:mod:`hopformer.train.report`.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hopformer report``."""
    parser.add_argument("runs", nargs="+", help="run folders (each with config.yaml and metrics.jsonl)")
    parser.add_argument("--out", help="folder to write report.md, report.json and curves.png into")


def run(args: argparse.Namespace) -> int:
    """Print the table; with ``--out``, write it, its data and the curves there."""
    from hopformer.train.report import read_run, summarise, to_markdown, write_report

    report = summarise([read_run(Path(path)) for path in args.runs])
    print(to_markdown(report), end="")
    if args.out:
        out = Path(args.out)
        written = write_report(report, out)
        print(f"wrote {out / 'report.md'} and {out / 'report.json'}")
        if out / "curves.png" in written:
            print(f"wrote {out / 'curves.png'}")
        else:
            print("curves.png not drawn: matplotlib is missing (pip install 'hopformer[plot]')")
    return 0
