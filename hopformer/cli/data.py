"""``hopformer data``: generate task data in the released LRA layout.

hopformer data listops --out DIR --train N --val N --test N --seed S
hopformer data listops-baseline DIR  (the root-operator floor of a ListOps data set)
hopformer data pathfinder ...        (arguments defined by hopformer.data.pathfinder)
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

_PATHFINDER = "hopformer.data.pathfinder"


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``listops`` and ``pathfinder`` sub-commands to the ``data`` verb's parser."""
    tasks = parser.add_subparsers(dest="task", metavar="TASK", required=True)

    listops = tasks.add_parser(
        "listops",
        help="ListOps trees as basic_{train,val,test}.tsv (LRA: 96000/2000/2000, 500 < length < 2000)",
        description="Generate one set of unique ListOps trees and split it in order into "
        "basic_train.tsv, basic_val.tsv and basic_test.tsv, as the released script does.",
    )
    listops.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    listops.add_argument("--train", type=_count, default=96_000, help="training examples (default 96000)")
    listops.add_argument("--val", type=_count, default=2_000, help="validation examples (default 2000)")
    listops.add_argument("--test", type=_count, default=2_000, help="test examples (default 2000)")
    listops.add_argument("--seed", type=_count, default=0, help="random seed, >= 0 (default 0)")
    listops.add_argument("--min-length", type=_count, default=500, help="keep trees longer than this")
    listops.add_argument("--max-length", type=_count, default=2000, help="keep trees shorter than this")
    listops.add_argument("--max-depth", type=_count, default=10, help="depth at which nodes are digits")
    listops.add_argument("--max-args", type=_count, default=10, help="most arguments of an operator")
    listops.add_argument("--workers", type=_count, default=None, help="processes (default: all cores)")
    listops.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    listops.set_defaults(handler=_run_listops)

    baseline = tasks.add_parser(
        "listops-baseline",
        help="accuracy of guessing ListOps labels from the root operator alone (the floor a model must clear)",
        description="For each split, the accuracy of guessing every label from the tree's root operator "
        "alone (the most common label under that operator in basic_train.tsv), beside the majority-class "
        "rate. A model at this number reads nothing beyond the first token.",
    )
    baseline.add_argument(
        "data_dir", type=Path, help="folder with basic_{train,val,test}.tsv (or its listops-1000/ subfolder)"
    )
    baseline.set_defaults(handler=_run_listops_baseline)

    pathfinder_help = "Pathfinder images and metadata in the released pathfinder<res>/ layout"
    try:
        pathfinder = importlib.import_module(_PATHFINDER)
    except ModuleNotFoundError as error:
        if error.name != _PATHFINDER:
            raise
        # Still listed, so the user learns why it cannot run rather than "invalid choice".
        # prefix_chars="+" makes "--out" and the like plain words, so any arguments are accepted.
        sub = tasks.add_parser(
            "pathfinder",
            help=f"{pathfinder_help} (not available in this build)",
            prefix_chars="+",
            add_help=False,
        )
        sub.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
        sub.set_defaults(handler=_pathfinder_missing)
    else:
        sub = tasks.add_parser("pathfinder", help=pathfinder_help)
        pathfinder.add_arguments(sub)
        sub.set_defaults(handler=pathfinder.run_from_args)


def run(args: argparse.Namespace) -> int:
    """Run the chosen sub-command; return the exit status."""
    return int(args.handler(args) or 0)


def _count(text: str) -> int:
    """argparse type: a non-negative integer (argparse names the argument in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def _run_listops(args: argparse.Namespace) -> int:
    from hopformer.data.listops import generate_listops, write_listops_tsv

    prog = "hopformer data listops"
    if args.max_length <= args.min_length:
        print(
            f"{prog}: error: argument --max-length: must be greater than --min-length "
            f"({args.min_length}), got {args.max_length}",
            file=sys.stderr,
        )
        return 2
    for flag, value, smallest in (("--max-depth", args.max_depth, 1), ("--max-args", args.max_args, 2)):
        if value < smallest:
            print(f"{prog}: error: argument {flag}: must be at least {smallest}, got {value}", file=sys.stderr)
            return 2
    if args.workers == 0:
        print(f"{prog}: error: argument --workers: must be at least 1, got 0", file=sys.stderr)
        return 2
    sizes = {"train": args.train, "val": args.val, "test": args.test}
    try:
        examples = generate_listops(
            sum(sizes.values()),
            seed=args.seed,
            min_length=args.min_length,
            max_length=args.max_length,
            max_depth=args.max_depth,
            max_args=args.max_args,
            workers=args.workers,
            progress=not args.no_progress,
        )
    except ValueError as error:  # settings no tree can meet, named by generate_listops
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2

    args.out.mkdir(parents=True, exist_ok=True)
    start = 0
    for split, size in sizes.items():  # one unique set, split in order like the released script
        path = write_listops_tsv(args.out / f"basic_{split}.tsv", examples[start : start + size])
        print(f"wrote {size} examples to {path}")
        start += size
    return 0


def _run_listops_baseline(args: argparse.Namespace) -> int:
    from hopformer.data.listops import load_listops_tsv, root_operator_baseline

    folder = args.data_dir
    if not (folder / "basic_train.tsv").is_file() and (folder / "listops-1000" / "basic_train.tsv").is_file():
        folder = folder / "listops-1000"
    paths = {split: folder / f"basic_{split}.tsv" for split in ("train", "val", "test")}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        print(f"hopformer data listops-baseline: error: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        splits = {split: load_listops_tsv(path, max_length=None) for split, path in paths.items()}
    except ValueError as error:  # names the file, line and reason
        print(f"hopformer data listops-baseline: error: {error}", file=sys.stderr)
        return 2
    print(f"{'split':6s} {'examples':>9s} {'root operator':>14s} {'majority class':>15s}")
    for split, examples in splits.items():
        labels = [example["label"] for example in examples]
        majority = max(labels.count(label) for label in set(labels)) / len(labels)
        accuracy = root_operator_baseline(splits["train"], examples)
        print(f"{split:6s} {len(examples):9d} {100 * accuracy:13.2f}% {100 * majority:14.2f}%")
    return 0


def _pathfinder_missing(args: argparse.Namespace) -> int:
    print(
        f"hopformer data pathfinder: not available: the module {_PATHFINDER} is not in this build",
        file=sys.stderr,
    )
    return 2
