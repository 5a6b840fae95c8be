"""``hopformer lra``: run (sequentially) or collect a grid of LRA runs and write one results table.

    hopformer lra --tasks listops,pathfinder32 --attentions full,bigbird,diffuser \\
        --config-dir configs/lra --runs-dir runs/lra --data-dir lra_release
    hopformer lra --tasks listops --attentions full,diffuser --seeds 0,1,2 --collect-only

Each cell is the run folder ``<runs-dir>/<task>-<attention>-s<seed>`` trained with
``<config-dir>/<task>.yaml`` (``--scale pytorch``: ``<task>_pytorch.yaml``, the small PyTorch
setting). A finished run (``results.json``) is collected, a killed, interrupted or time-limited one
resumed (from its ``last/``), a missing one trained (unless ``--collect-only``).

``--pretrain-steps N`` self-pretrains every cell first (Amos et al. 2023): the run folder
``<cell>-pretrain`` trains the same model for N steps on the masked objective
(``train.objective=masked``; ``--pretrain-set KEY=VALUE`` adds settings for this stage only, e.g.
``optim.lr=3e-4``), and the cell's classifier then starts from its encoder (``train.init_from``). Both
stages are resumed like any run.

``--time-limit MIN`` (or ``--set train.time_limit_minutes=MIN``) is one deadline for the whole grid,
counted from the start of the command: the running cell checkpoints and stops before it, cells not yet
started are left for the next call, and the table is written with what is finished. Running the same
command again continues where it stopped. The table (``results.md``) and ``results.json`` go to
``--runs-dir``: test accuracy per task (mean ± std over seeds), the average over the tasks of the
grid, and the published rows of specs/lra.md §7 beside them (JAX leaderboard rows for the official
scale, the Nyströmformer paper's "Standard" row for the PyTorch scale; never mix the two).
"""

from __future__ import annotations

import argparse
import json
import statistics
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hopformer.train.trainer import TrainResult

_MIN_CELL_SECONDS = 90.0  # a cell is not started with less time than this left before the deadline
COLUMNS = {"listops": "ListOps", "text": "Text", "retrieval": "Retrieval", "image": "Image", "pathfinder32": "Path"}

# Official LRA README (8 Nov 2020), 5-task average (specs/lra.md §7).
LEADERBOARD_JAX: dict[str, dict[str, float]] = {
    name: dict(zip(["listops", "text", "retrieval", "image", "pathfinder32", "avg"], values))
    for name, values in {
        "Local Attention": (15.82, 52.98, 53.39, 41.46, 66.63, 46.06),
        "Linear Transformer": (16.13, 65.90, 53.09, 42.34, 75.30, 50.55),
        "Reformer": (37.27, 56.10, 53.40, 38.07, 68.50, 50.67),
        "Sparse Transformer": (17.07, 63.58, 59.59, 44.24, 71.71, 51.24),
        "Sinkhorn Transformer": (33.67, 61.20, 53.83, 41.23, 67.45, 51.29),
        "Linformer": (35.70, 53.94, 52.27, 38.56, 76.34, 51.36),
        "Performer": (18.01, 65.40, 53.82, 42.77, 77.05, 51.41),
        "Synthesizer": (36.99, 61.68, 54.67, 41.61, 69.45, 52.88),
        "Longformer": (35.63, 62.85, 56.89, 42.22, 69.71, 53.46),
        "Transformer": (36.37, 64.27, 57.46, 42.44, 71.40, 54.39),
        "BigBird": (36.05, 64.02, 59.29, 40.83, 74.87, 55.01),
    }.items()
}
# Nyströmformer paper (AAAI 2021), small PyTorch setting.
LEADERBOARD_PYTORCH: dict[str, dict[str, float]] = {
    "Standard (Nyströmformer paper)": {
        "listops": 37.10,
        "text": 65.02,
        "retrieval": 79.35,
        "image": 38.20,
        "pathfinder32": 74.16,
        "avg": 58.77,
    },  # fmt: skip
}


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
    """Train or collect every cell, then write ``results.md`` and ``results.json``."""
    from hopformer.train import trainer as loop
    from hopformer.train.config import parse_assignment
    from hopformer.train.trainer import RESULTS_NAME

    started = loop._now()
    tasks, attentions = _names(args.tasks), _names(args.attentions)
    seeds = [int(seed) for seed in _names(args.seeds)]
    unknown = [task for task in tasks if task not in COLUMNS]
    if unknown:
        raise SystemExit(f"hopformer lra: unknown task(s) {unknown}; choose from {list(COLUMNS)}")
    if args.pretrain_steps is not None and args.pretrain_steps < 1:
        raise SystemExit(f"hopformer lra: --pretrain-steps must be a positive step count, got {args.pretrain_steps}")
    assignments = dict(parse_assignment(text) for text in args.set)
    pretrain_assignments = dict(parse_assignment(text) for text in args.pretrain_set)
    if pretrain_assignments and args.pretrain_steps is None:
        raise SystemExit("hopformer lra: --pretrain-set needs --pretrain-steps")
    limit = args.time_limit if args.time_limit is not None else assignments.get("train.time_limit_minutes")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
        raise SystemExit(f"hopformer lra: the time limit must be a positive number of minutes, got {limit!r}")
    deadline = None if limit is None else started + 60.0 * limit
    runs_dir = Path(args.runs_dir)
    suffix = "" if args.scale == "official" else "_pytorch"
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    unfinished: list[str] = []
    failed: list[str] = []  # the error.txt of each run that raised
    stopped = False  # a Ctrl-C or SIGTERM ends the grid
    for task in tasks:
        for attention in attentions:
            for seed in seeds:
                run_dir = runs_dir / f"{task}-{attention}-s{seed}"
                results = run_dir / RESULTS_NAME
                if not results.is_file() and not args.collect_only:
                    if stopped or (deadline is not None and deadline - loop._now() < _MIN_CELL_SECONDS):
                        unfinished.append(run_dir.name)
                        continue
                    # the cell's task wins over its config file's, so a cell never trains another task
                    overrides = {"task": task, "model.attention": attention, "train.seed": seed}
                    if args.data_dir:
                        overrides["data.data_dir"] = args.data_dir
                    if args.device:
                        overrides["train.device"] = args.device
                    if args.no_progress:
                        overrides["train.progress"] = False
                    overrides.update(assignments)
                    if limit is not None:
                        overrides["train.time_limit_minutes"] = limit
                    stages = []  # (run folder, its overrides): the pretraining first, when asked for
                    if args.pretrain_steps is not None:
                        pretrain_dir = run_dir.with_name(run_dir.name + "-pretrain")
                        pretrain = {**overrides, "train.objective": "masked", "train.steps": args.pretrain_steps}
                        stages.append((pretrain_dir, {**pretrain, **pretrain_assignments}))
                        overrides["train.init_from"] = str(pretrain_dir)
                    stages.append((run_dir, overrides))
                    config_path = Path(args.config_dir) / f"{task}{suffix}.yaml"
                    for stage_dir, stage_overrides in stages:
                        if (stage_dir / RESULTS_NAME).is_file():
                            continue
                        print(f"== {task} / {attention} / seed {seed} -> {stage_dir}")
                        result = _train_stage(stage_dir, config_path, stage_overrides, limit, args, deadline)
                        if result is None:
                            failed.append(str(stage_dir / "error.txt"))
                            break
                        if result.interrupted:
                            unfinished.append(run_dir.name)
                            stopped = result.stop_reason != "time_limit"
                            break
                if results.is_file():
                    cells.setdefault((task, attention), []).append(json.loads(results.read_text()))

    table = summarise(tasks, attentions, cells, args.scale)
    if args.pretrain_steps is not None:
        table["pretrain_steps"] = args.pretrain_steps
    runs_dir.mkdir(parents=True, exist_ok=True)
    (runs_dir / "results.json").write_text(json.dumps(table, indent=2) + "\n")
    markdown = to_markdown(table)
    (runs_dir / "results.md").write_text(markdown)
    print(markdown)
    print(f"wrote {runs_dir / 'results.md'} and {runs_dir / 'results.json'}")
    if unfinished:
        print(f"not finished: {', '.join(unfinished)}; run the same command again to continue")
    if failed:
        print(f"failed: see {', '.join(failed)}")
    return 0


def _train_stage(
    run_dir: Path,
    config_path: Path,
    overrides: dict[str, Any],
    limit: float | None,
    args: argparse.Namespace,
    deadline: float | None,
) -> TrainResult | None:
    """Resume ``run_dir`` from its ``last/``, or start it from ``config_path``; None when it failed.

    A failing run (missing data...) must not stop the grid: its traceback goes to ``error.txt``.
    """
    from hopformer.train.checkpoint import find_checkpoint
    from hopformer.train.config import load_config
    from hopformer.train.trainer import train

    try:
        if find_checkpoint(run_dir / "last") is not None:
            resume: dict[str, Any] = {"train.time_limit_minutes": limit} if limit is not None else {}
            if args.no_progress:
                resume["train.progress"] = False
            return train(resume=run_dir, resume_overrides=resume or None, deadline=deadline)
        config = load_config(config_path, {**overrides, "train.run_dir": str(run_dir)})
        return train(config, deadline=deadline)
    except KeyboardInterrupt:
        raise
    except Exception:
        traceback.print_exc()
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.txt").write_text(traceback.format_exc())
        return None


def summarise(
    tasks: list[str], attentions: list[str], cells: dict[tuple[str, str], list[dict[str, Any]]], scale: str
) -> dict[str, Any]:
    """Test accuracy (%) per attention and task, mean and std over seeds, the average, and reference rows."""
    rows = []
    for attention in attentions:
        row: dict[str, Any] = {"model": f"hopformer {attention}", "tasks": {}}
        for task in tasks:
            runs = cells.get((task, attention), [])
            accuracies = [100 * r["test_accuracy"] for r in runs]
            if accuracies:
                row["tasks"][task] = {
                    "mean": statistics.fmean(accuracies),
                    "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,  # sample std (n - 1)
                    "seeds": len(accuracies),
                }
                final = sum(r.get("extra", {}).get("test_checkpoint") == "final" for r in runs)
                if final:  # runs whose best/ checkpoint was missing at the end: the test scored the final weights
                    row["tasks"][task]["final_weights"] = final
                for key in ("steps_per_s", "peak_memory_mib"):  # training cost, median over seeds
                    values = [r["extra"][key] for r in runs if key in r.get("extra", {})]
                    if values:
                        row["tasks"][task][key] = statistics.median(values)
        done = [row["tasks"][t]["mean"] for t in tasks if t in row["tasks"]]
        row["avg"] = statistics.fmean(done) if len(done) == len(tasks) else None
        rows.append(row)
    board = LEADERBOARD_JAX if scale == "official" else LEADERBOARD_PYTORCH
    reference = [
        {
            "model": name,
            "tasks": {t: values[t] for t in tasks},
            "avg": statistics.fmean(values[t] for t in tasks),
            "published_avg": values["avg"],
        }
        for name, values in board.items()
    ]
    return {"scale": scale, "tasks": tasks, "rows": rows, "reference": reference}


def to_markdown(table: dict[str, Any]) -> str:
    """The results as a Markdown table: hopformer rows first, then the published reference rows."""
    tasks = table["tasks"]
    header = "| model | " + " | ".join(COLUMNS[t] for t in tasks) + " | Avg |"
    lines = [header, "|" + "---|" * (len(tasks) + 2)]
    for row in table["rows"]:
        cells = []
        for task in tasks:
            cell = row["tasks"].get(task)
            if cell is None:
                cells.append("–")
            else:
                text = f"{cell['mean']:.2f} ± {cell['std']:.2f}" if cell["seeds"] > 1 else f"{cell['mean']:.2f}"
                cells.append(text + (" †" if cell.get("final_weights") else ""))
        average = "–" if row["avg"] is None else f"{row['avg']:.2f}"
        lines.append(f"| **{row['model']}** | " + " | ".join(cells) + f" | {average} |")
    for row in table["reference"]:
        cells = [f"{row['tasks'][t]:.2f}" for t in tasks]
        lines.append(f"| {row['model']} (published) | " + " | ".join(cells) + f" | {row['avg']:.2f} |")
    source = (
        "published rows: official LRA README (JAX pipeline)"
        if table["scale"] == "official"
        else "published row: Nyströmformer paper (small PyTorch pipeline)"
    )
    note = (
        "\nTest accuracy (%), best-validation checkpoint; mean ± sample std over seeds. "
        f"Avg = mean over the {len(tasks)} task(s) above "
        f"(published rows re-averaged over the same tasks); {source}. Scale: {table['scale']}.\n"
    )
    if any(cell.get("final_weights") for row in table["rows"] for cell in row["tasks"].values()):
        note += "† includes runs whose best-validation checkpoint was missing: their test scored the final weights.\n"
    if "pretrain_steps" in table:
        note += f"Each hopformer run was first self-pretrained {table['pretrain_steps']} steps (masked objective).\n"
    return "\n".join(lines) + "\n" + note + _cost_markdown(table)


def _cost_markdown(table: dict[str, Any]) -> str:
    """Training steps/s and peak GPU memory per run, where the runs logged them; empty otherwise."""
    tasks = table["tasks"]
    if not any("steps_per_s" in cell for row in table["rows"] for cell in row["tasks"].values()):
        return ""
    lines = [
        "",
        "| model | " + " | ".join(f"{COLUMNS[t]} steps/s | {COLUMNS[t]} peak GiB" for t in tasks) + " |",
        "|" + "---|" * (2 * len(tasks) + 1),
    ]
    for row in table["rows"]:
        cells = []
        for task in tasks:
            cell = row["tasks"].get(task, {})
            cells.append(f"{cell['steps_per_s']:.2f}" if "steps_per_s" in cell else "–")
            cells.append(f"{cell['peak_memory_mib'] / 1024:.1f}" if "peak_memory_mib" in cell else "–")
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    note = (
        "\nTraining cost per run: median steps/s over the logged windows and the largest peak of CUDA "
        "memory allocated (training and evaluation); runs that shared a GPU ran slower than alone.\n"
    )
    return "\n".join(lines) + "\n" + note
