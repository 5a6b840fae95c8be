"""``hopformer train``: train a classifier on a task (ListOps by default, generated if missing).

    hopformer train --task listops --attention diffuser
    hopformer train --config configs/lra/listops.yaml --attention bigbird --data-dir lra_release
    hopformer train --attention diffuser --attention-option hops=3 --attention-option alpha=0.2
    hopformer train --resume runs/listops-diffuser-20250101-120000

Without ``--config`` the CPU default ``configs/listops_small.yaml`` is used. Command-line values
override the config file; ``--set section.key=value`` reaches any setting.
"""

from __future__ import annotations

import argparse

from hopformer.train.config import DEFAULT_CONFIG, load_config, parse_assignment

# flag -> dotted config key
_FLAGS = {
    "task": "task",
    "attention": "model.attention",
    "steps": "train.steps",
    "batch_size": "train.batch_size",
    "lr": "optim.lr",
    "seed": "train.seed",
    "device": "train.device",
    "run_dir": "train.run_dir",
    "eval_every": "train.eval_every",
    "data_dir": "data.data_dir",
}


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hopformer train``."""
    parser.add_argument("--config", help=f"YAML config (default configs/{DEFAULT_CONFIG.name})")
    parser.add_argument("--task", help="listops | text | retrieval | image | pathfinder32 (or lra-<name>)")
    parser.add_argument("--attention", help="attention name (hopformer.attention.available())")
    parser.add_argument(
        "--attention-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an attention keyword argument, value parsed as YAML (repeatable), e.g. hops=3",
    )
    parser.add_argument("--steps", type=int, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, help="examples per optimiser step")
    parser.add_argument("--lr", type=float, help="peak learning rate")
    parser.add_argument("--seed", type=int, help="seed of initialisation, data order and dropout")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto (CUDA when available)")
    parser.add_argument("--run-dir", help="run folder (default runs/<task>-<attention>-<timestamp>)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a killed or interrupted run from its last/")
    parser.add_argument("--eval-every", type=int, help="validate and checkpoint every N steps")
    parser.add_argument("--data-dir", help="data folder (ListOps TSVs, generated there if empty; or lra_release/)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any setting, e.g. model.dim=128 (repeatable)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def overrides_from_args(args: argparse.Namespace) -> dict:
    """Dotted config overrides from the parsed flags (only those given)."""
    overrides = {}
    for flag, key in _FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    for text in args.attention_option:
        key, value = parse_assignment(text)
        overrides[f"model.attention_options.{key}"] = value
    for text in args.set:
        key, value = parse_assignment(text)
        overrides[key] = value
    if args.no_progress:
        overrides["train.progress"] = False
    return overrides


def run(args: argparse.Namespace) -> int:
    """Train (or resume) and print where the run is and its test accuracy."""
    from hopformer.train.trainer import train

    overrides = overrides_from_args(args)
    if args.resume:
        if args.config or overrides:
            print("hopformer train: --resume uses the run's own config.yaml; other settings are ignored")
        result = train(resume=args.resume)
    else:
        result = train(load_config(args.config, overrides))
    if result.interrupted:
        return 130
    print(f"test accuracy: {result.test_accuracy:.4f}")
    print(f"run folder: {result.run_dir}")
    return 0
