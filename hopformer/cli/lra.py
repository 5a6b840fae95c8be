"""``hopformer lra``: run (one cell after another) or collect a grid of LRA runs and write one results table.

    hopformer lra --tasks listops,pathfinder32 --attentions full,bigbird,diffuser \\
        --config-dir configs/lra --runs-dir runs/lra --data-dir lra_release
    hopformer lra --tasks listops --attentions full,diffuser --seeds 0,1,2 --collect-only

Each cell is the run folder ``<runs-dir>/<task>-<attention>-s<seed>`` trained with
``<config-dir>/<task>.yaml`` (``--scale pytorch``: ``<task>_pytorch.yaml``). A finished run is collected,
an interrupted one resumed, a missing one trained (unless ``--collect-only``). ``--pretrain-steps N``
self-pretrains every cell first (``<cell>-pretrain``, masked objective; ``--pretrain-set KEY=VALUE`` adds
settings for that stage only). ``--time-limit MIN`` (or ``--set train.time_limit_minutes=MIN``) is one
deadline for the whole grid: running the same command again continues where it stopped. The table goes
to ``results.md`` and ``results.json`` in ``--runs-dir``, with the published rows of the scale beside it.
The grid itself is :func:`hopformer.train.grid.run_grid`.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hopformer lra``."""
    parser.add_argument("--tasks", default="listops", help="comma-separated: listops,text,retrieval,image,pathfinder32")
    parser.add_argument("--attentions", default="full,diffuser", help="comma-separated attention names")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (report mean ± std over them)")
    parser.add_argument("--config-dir", default="configs/lra", help="folder of <task>.yaml configs")
    parser.add_argument("--scale", choices=("official", "pytorch"), default="official",
                        help="official: <task>.yaml (LRA JAX settings); pytorch: <task>_pytorch.yaml")  # fmt: skip
    parser.add_argument("--runs-dir", default="runs/lra", help="where the runs and the table go")
    parser.add_argument("--data-dir", help="the lra_release/ folder (ListOps is generated when absent)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="override train.device")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any setting")
    parser.add_argument("--collect-only", action="store_true", help="do not train; tabulate the runs that exist")
    parser.add_argument("--pretrain-steps", type=int, metavar="N",
                        help="self-pretrain each cell N steps first (masked objective, <cell>-pretrain)")  # fmt: skip
    parser.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for the pretraining stage only, e.g. optim.lr=3e-4")  # fmt: skip
    parser.add_argument(
        "--time-limit", type=float, metavar="MIN", help="stop cleanly before MIN minutes; run again to continue"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _names(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def run(args: argparse.Namespace) -> int:
    """Check the arguments, run the grid, print the table and what is left to do."""
    from hopformer.train.config import parse_assignment
    from hopformer.train.grid import COLUMNS, run_grid

    tasks, attentions = _names(args.tasks), _names(args.attentions)
    seeds = [int(seed) for seed in _names(args.seeds)]
    unknown = [task for task in tasks if task not in COLUMNS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {list(COLUMNS)}")
    if args.pretrain_steps is not None and args.pretrain_steps < 1:
        raise ValueError(f"--pretrain-steps must be a positive step count, got {args.pretrain_steps}")
    assignments = dict(parse_assignment(text) for text in args.set)
    pretrain_assignments = dict(parse_assignment(text) for text in args.pretrain_set)
    if pretrain_assignments and args.pretrain_steps is None:
        raise ValueError("--pretrain-set needs --pretrain-steps")
    limit = args.time_limit if args.time_limit is not None else assignments.get("train.time_limit_minutes")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
        raise ValueError(f"the time limit must be a positive number of minutes, got {limit!r}")
    overrides = {}
    if args.data_dir:
        overrides["data.data_dir"] = args.data_dir
    if args.device:
        overrides["train.device"] = args.device
    result = run_grid(
        tasks, attentions, seeds, args.runs_dir, config_dir=args.config_dir, scale=args.scale,
        overrides={**overrides, **assignments}, pretrain_steps=args.pretrain_steps,
        pretrain_overrides=pretrain_assignments, time_limit=limit, progress=not args.no_progress,
        collect_only=args.collect_only,
    )  # fmt: skip
    print(result.markdown)
    runs_dir = Path(args.runs_dir)
    print(f"wrote {runs_dir / 'results.md'} and {runs_dir / 'results.json'}")
    if result.unfinished:
        print(f"not finished: {', '.join(result.unfinished)}; run the same command again to continue")
    if result.failed:
        print(f"failed: see {', '.join(result.failed)}")
    return 0
