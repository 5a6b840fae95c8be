"""``hopformer train``: train a model on a task (ListOps by default, generated if missing).

    hopformer train --task listops --attention diffuser
    hopformer train --task bytes --objective causal --attention diffuser     # a byte LM on the stdlib's sources
    hopformer train --task bytes:corpus.txt --objective causal --attention routing
    hopformer train --config configs/lra/listops.yaml --attention bigbird --data-dir lra_release
    hopformer train --attention diffuser --attention-option hops=3 --attention-option alpha=0.2
    hopformer train --resume runs/listops-diffuser-20250101-120000
    hopformer train --config configs/lra/listops.yaml --time-limit 8 --run-dir runs/lra/listops-full-s0

Without ``--config`` the packaged CPU default is used (a small ListOps run, the settings of
``configs/listops_small.yaml``). Command-line values override the config file; ``--set section.key=value``
reaches any setting.

``--time-limit MIN`` stops the run cleanly before MIN minutes (counted from the start of training, data
loading included): it saves ``last/``, logs "stopped at time limit, resume with --resume RUN" and exits
with status 0. Ctrl-C (SIGINT) or SIGTERM saves ``last/`` at the end of the current step and exits with
130 or 143. ``--resume RUN`` continues exactly; with it only ``--time-limit``, ``--no-progress``,
``--set train.parallel=...`` and (for the ``rsqrt``/``constant`` schedules) ``--steps`` may be given.

Several processes: ``torchrun --nproc-per-node N -m hopformer train ...`` trains with DDP, or with FSDP2 given
``--set train.parallel=fsdp``; ``--batch-size`` stays the global batch of an optimiser step. Rank 0 logs and writes
the run folder; its checkpoints resume under any number of processes (see ``hopformer.train.distributed``).

Exit status: 0 finished or stopped at the time limit, 130 SIGINT, 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import os

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
    "time_limit": "train.time_limit_minutes",
    "objective": "train.objective",
}
# the settings a resumed run may change, by flag (the trainer checks the rest)
_RESUME_FLAGS = {"time_limit": "train.time_limit_minutes", "steps": "train.steps"}
_EXIT_STATUS = {"time_limit": 0, "SIGINT": 130, "SIGTERM": 143}


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hopformer train``."""
    parser.add_argument("--config", help="YAML config (default: the packaged small ListOps CPU run)")
    parser.add_argument(
        "--task",
        help="listops | text | retrieval | image | pathfinder32 (or lra-<name>); a corpus: bytes[:PATH] (the Python "
        "standard library's sources, or any file or folder) | enwik8:DIR | text8:DIR | wikitext103:DIR | "
        "wikitext103-raw:DIR | pg19:DIR; an image set: cifar10-pixels:DIR | imagenet64-pixels:DIR | pathfinder-pixels",
    )
    parser.add_argument(
        "--objective",
        choices=("classify", "masked", "causal"),
        help="classify the task's labels; masked: masked LM (BERT masking; self-pretraining on example tasks); "
        "causal: next-token prediction (corpora and image sets)",
    )
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
    parser.add_argument(
        "--time-limit",
        type=float,
        metavar="MIN",
        help="checkpoint and exit (status 0) before MIN minutes; continue with --resume (also with --resume)",
    )


def overrides_from_args(args: argparse.Namespace) -> dict:
    """Dotted config overrides from the parsed flags (only those given)."""
    from hopformer.train.config import parse_assignment

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
    from hopformer.train.config import load_config
    from hopformer.train.loop import train

    overrides = overrides_from_args(args)
    if args.resume:
        resumable = [*_RESUME_FLAGS.values(), "train.progress", "train.parallel"]
        allowed = {key: overrides.pop(key) for key in resumable if key in overrides}
        if args.config or overrides:
            print("hopformer train: --resume uses the run's own config.yaml; other settings are ignored")
        result = train(resume=args.resume, resume_overrides=allowed)
    else:
        result = train(load_config(args.config, overrides))
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports
        return _EXIT_STATUS.get(result.stop_reason, 130) if result.interrupted else 0
    if result.interrupted:
        print(f"run folder: {result.run_dir} (stopped at step {result.step}: {result.stop_reason})")
        return _EXIT_STATUS.get(result.stop_reason, 130)
    extra = result.extra  # (the trainer's last log line names the run folder)
    scores = [key for key in extra if key.startswith("test_") and key != "test_checkpoint"]
    if scores:  # a language or pixel model, beside the unigram model of its training split
        metric = scores[0].removeprefix("test_")
        baseline = extra.get(f"unigram_{metric}")
        versus = "" if baseline is None else f" (unigram baseline {baseline:.4f})"
        print(f"{metric.replace('_', ' ')} {extra[scores[0]]:.4f}{versus}")
        return 0
    # the last line: the result beside every trivial baseline of the task, on the same test set
    rules = [("majority class", result.majority_rate), ("root-operator rule", extra.get("root_operator_rate"))]
    shown = ", ".join(f"{name} {rate:.4f}" for name, rate in rules if rate is not None)
    versus = f"trivial baselines on test: {shown}" if shown else "over hidden tokens"
    print(f"test accuracy {result.test_accuracy:.4f} ({versus})")
    return 0
