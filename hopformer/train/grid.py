"""LRA grids: train (one after the other) or collect the (task x attention x seed) runs, and tabulate them.

Each cell is the run folder ``<runs_dir>/<task>-<attention>-s<seed>`` trained with
``<config_dir>/<task>.yaml`` (``scale="pytorch"``: ``<task>_pytorch.yaml``, the small PyTorch setting).
A finished run (``results.json``) is collected, a killed, interrupted or time-limited one resumed (from its
``last/``), a missing one trained (unless ``collect_only``).

``pretrain_steps`` self-pretrains every cell first (Amos et al. 2023): the run folder ``<cell>-pretrain``
trains the same model for that many steps on the masked objective (``pretrain_overrides`` add settings
for this stage only), and the cell's classifier then starts from its encoder (``train.init_from``).

``time_limit`` (minutes) is one deadline for the whole grid, counted from the start of :func:`run_grid`:
the running cell checkpoints and stops before it, cells not yet started are left for the next call, and
the table is written with what is finished. Calling it again continues where it stopped. The table
(``results.md``) and ``results.json`` go to ``runs_dir``: test accuracy per task (mean ± std over seeds),
the average over the tasks of the grid, and the published rows (``published_lra.yaml``, shipped with
the package) beside them: the JAX leaderboard for the official scale, the Nyströmformer paper's
"Standard" row for the PyTorch scale; never mix the two.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import statistics
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hopformer.checks import read_json
from hopformer.train import control
from hopformer.train.checkpoint import find_checkpoint
from hopformer.train.config import load_config
from hopformer.train.loop import TrainResult, train
from hopformer.train.metrics import RESULTS_NAME

MIN_CELL_SECONDS = 90.0  # a cell is not started with less time than this left before the deadline
COLUMNS = {"listops": "ListOps", "text": "Text", "retrieval": "Retrieval", "image": "Image", "pathfinder32": "Path"}
SCALES = ("official", "pytorch")


@functools.cache
def _published() -> dict[str, Any]:
    text = importlib.resources.files("hopformer.train").joinpath("published_lra.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def published_lra(scale: str) -> dict[str, Any]:
    """The published board of ``scale`` (``"official"`` or ``"pytorch"``): ``{"source", "note", "rows"}``,
    ``rows`` mapping each model to its test accuracy (%) per task and ``avg``."""
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r} is not known; choose one of {list(SCALES)}")
    return _published()[scale]


@dataclass
class GridResult:
    """What :func:`run_grid` did: the table (also in ``results.json``), its Markdown (``results.md``), the
    cells left for a later call, and the ``error.txt`` of each stage that failed."""

    table: dict[str, Any]
    markdown: str
    unfinished: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def run_grid(
    tasks: list[str],
    attentions: list[str],
    seeds: list[int],
    runs_dir: str | Path,
    *,
    config_dir: str | Path = "configs/lra",
    scale: str = "official",
    overrides: dict[str, Any] | None = None,
    pretrain_steps: int | None = None,
    pretrain_overrides: dict[str, Any] | None = None,
    time_limit: float | None = None,
    progress: bool = True,
    collect_only: bool = False,
    log: Any = print,
) -> GridResult:
    """Train or collect every cell, then write ``results.md`` and ``results.json`` into ``runs_dir``.

    Args:
        tasks, attentions, seeds: the grid (tasks from :data:`COLUMNS`).
        runs_dir: where the cells' run folders and the table go.
        config_dir, scale: each cell trains with ``<config_dir>/<task>.yaml`` (``<task>_pytorch.yaml`` at
            the ``"pytorch"`` scale); the scale also picks the published rows.
        overrides: dotted settings for every cell, over its task, attention and seed.
        pretrain_steps, pretrain_overrides: self-pretrain each cell first, with these extra settings.
        time_limit: minutes for the whole grid (see the module docstring).
        progress: progress bars; collect_only: train nothing, tabulate what exists.
        log: where the line naming each stage as it starts goes.
    """
    started = control.clock()
    unknown = [task for task in tasks if task not in COLUMNS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {list(COLUMNS)}")
    published_lra(scale)  # a bad scale fails before any training
    deadline = None if time_limit is None else started + 60.0 * time_limit
    runs_dir = Path(runs_dir)
    suffix = "" if scale == "official" else "_pytorch"
    common = {} if progress else {"train.progress": False}
    common.update(overrides or {})
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    result = GridResult({}, "")
    stopped = False  # a Ctrl-C or SIGTERM ends the grid
    for task in tasks:
        for attention in attentions:
            for seed in seeds:
                run_dir = runs_dir / f"{task}-{attention}-s{seed}"
                results = run_dir / RESULTS_NAME
                if not results.is_file() and not collect_only:
                    if stopped or (deadline is not None and deadline - control.clock() < MIN_CELL_SECONDS):
                        result.unfinished.append(run_dir.name)
                        continue
                    # the cell's task wins over its config file's, so a cell never trains another task
                    cell = {"task": task, "model.attention": attention, "train.seed": seed, **common}
                    if time_limit is not None:
                        cell["train.time_limit_minutes"] = time_limit
                    stages = []  # (run folder, its overrides): the pretraining first, when asked for
                    if pretrain_steps is not None:
                        pretrain_dir = run_dir.with_name(run_dir.name + "-pretrain")
                        pretrain = {**cell, "train.objective": "masked", "train.steps": pretrain_steps}
                        stages.append((pretrain_dir, {**pretrain, **(pretrain_overrides or {})}))
                        cell["train.init_from"] = str(pretrain_dir)
                    stages.append((run_dir, cell))
                    config_path = Path(config_dir) / f"{task}{suffix}.yaml"
                    for stage_dir, stage_overrides in stages:
                        if (stage_dir / RESULTS_NAME).is_file():
                            continue
                        log(f"== {task} / {attention} / seed {seed} -> {stage_dir}")
                        outcome = _train_stage(stage_dir, config_path, stage_overrides, time_limit, progress, deadline)
                        if outcome is None:
                            result.failed.append(str(stage_dir / "error.txt"))
                            break
                        if outcome.interrupted:
                            result.unfinished.append(run_dir.name)
                            stopped = outcome.stop_reason != "time_limit"
                            break
                if results.is_file():
                    cells.setdefault((task, attention), []).append(read_json(results))

    result.table = summarise(tasks, attentions, cells, scale)
    if pretrain_steps is not None:
        result.table["pretrain_steps"] = pretrain_steps
    runs_dir.mkdir(parents=True, exist_ok=True)
    (runs_dir / "results.json").write_text(json.dumps(result.table, indent=2) + "\n")
    result.markdown = to_markdown(result.table)
    (runs_dir / "results.md").write_text(result.markdown)
    return result


def _train_stage(
    run_dir: Path,
    config_path: Path,
    overrides: dict[str, Any],
    limit: float | None,
    progress: bool,
    deadline: float | None,
) -> TrainResult | None:
    """Resume ``run_dir`` from its ``last/``, or start it from ``config_path``; None when it failed.

    A failing run (missing data...) must not stop the grid: its traceback goes to ``error.txt``.
    """
    try:
        if find_checkpoint(run_dir / "last") is not None:
            resume: dict[str, Any] = {"train.time_limit_minutes": limit} if limit is not None else {}
            if not progress:
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
    board = published_lra(scale)["rows"]
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
    source = published_lra(table["scale"])["note"]
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
