"""Checkpoints: a folder per checkpoint (``last/``, ``best/``) inside the run folder.

Each holds ``config.json`` + ``model.safetensors`` (so ``hopformer.models.from_pretrained`` reads it)
and ``state.pt``: optimiser, step, RNG states, data-order position, best metric. ``state.pt`` holds
only tensors and plain containers, written with ``torch.save`` and read with ``weights_only=True``.

Atomicity: a checkpoint is written into a temporary folder beside its final place (every file there
written to a temp file and renamed), then swapped in with ``os.replace``; the previous one is
removed only after. A crash at any moment leaves either the old or the new checkpoint complete, and
no temporary files once the next save or load tidies up.

:func:`save_training_checkpoint` and :func:`resume_training` are the trainer's side: what ``state.pt`` holds
(:class:`TrainState`, the optimiser, the data order, the RNGs), so a resumed run continues exactly.
"""

from __future__ import annotations

import math
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hopformer.checks import FileFormatError, file_error
from hopformer.models.pretrained import WEIGHTS_NAME, atomic_write, load_into, read_weights
from hopformer.train.metrics import Window
from hopformer.train.optim import learning_rate

if TYPE_CHECKING:
    from hopformer.train.config import Config

STATE_NAME = "state.pt"


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA generator states as tensors and plain values (``weights_only``-safe)."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state(
        (numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["position"], numpy["has_gauss"], numpy["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: str | os.PathLike, model: Any, state: dict[str, Any]) -> Path:
    """Write ``model`` (``save_pretrained``) and the training ``state`` into ``directory``, atomically."""
    directory = Path(directory)
    staging = directory.with_name(f".{directory.name}.tmp")
    retired = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging)
        atomic_write(staging / STATE_NAME, lambda path: torch.save(state, path))
        if directory.exists():
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(directory, retired)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(retired, ignore_errors=True)
    return directory


def find_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The complete checkpoint at ``directory``, or the previous one if a crash hit between the two renames."""
    directory = Path(directory)
    retired = directory.with_name(f".{directory.name}.old")
    if (directory / STATE_NAME).is_file():
        return directory
    if (retired / STATE_NAME).is_file():
        return retired
    return None


def load_state(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The training state of a checkpoint folder, read with ``weights_only=True``; a truncated or damaged
    ``state.pt`` is a :class:`~hopformer.checks.FileFormatError` naming it."""
    path = Path(directory) / STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such training state")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch.load fails in many ways on a cut file: RuntimeError, EOFError, IndexError...
        raise file_error(path, "not a readable training state (truncated or damaged?)", error) from None
    if not isinstance(state, dict):
        raise file_error(path, f"a training state must be a dict, got {type(state).__name__}")
    return state


def check_state(state: dict[str, Any], path: str | os.PathLike, metric: str = "accuracy") -> None:
    """Check the values a resume reads from ``state.pt`` (at ``path``): a non-negative step, a finite best score
    or none, the optimiser's, data order's, RNGs' and log window's entries of the right kinds."""

    def bad(key: str, wanted: str) -> FileFormatError:
        return file_error(path, f"{key} must be {wanted}, got {_short(state.get(key))}")

    missing = sorted({"step", "optimizer", "data", "rng"} - set(state))
    if missing:
        raise file_error(path, f"a training state holds step, optimizer, data and rng; {missing} missing")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise bad("step", "a non-negative integer")
    best = state.get(f"best_val_{metric}")
    if best is not None and (isinstance(best, bool) or not isinstance(best, (int, float)) or not math.isfinite(best)):
        raise bad(f"best_val_{metric}", "a finite number or None")
    optimizer = state["optimizer"]
    if not isinstance(optimizer, dict) or not {"state", "param_groups"} <= set(optimizer):
        raise bad("optimizer", "an optimizer state dict (state, param_groups)")
    data = state["data"]
    if not isinstance(data, dict) or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in data.values()):
        raise bad("data", "a dict of non-negative integers (the data order's position)")
    if not isinstance(state["rng"], dict) or not {"python", "numpy", "torch"} <= set(state["rng"]):
        raise bad("rng", "the random generators' states (python, numpy, torch)")
    window = state.get("window", {})
    numbers = isinstance(window, dict) and all(
        not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in window.values()
    )
    if not numbers:
        raise bad("window", "a dict of finite non-negative numbers (the log window's sums)")


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, (dict, list, tuple)) else f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def load_weights(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Load ``model.safetensors`` of a checkpoint folder into ``model`` (on its device)."""
    device = next(model.parameters()).device
    path = Path(directory) / WEIGHTS_NAME
    load_into(model, read_weights(path, device), path)


@dataclass
class TrainState:
    """Where a run is: optimiser steps done, best validation accuracy so far, the log window's sums."""

    step: int = 0
    best: float | None = None
    window: Window = field(default_factory=Window)


def save_training_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    stream: Any,
    state: TrainState,
    config: Config,
    metric: str = "accuracy",
    *,
    optimizer_state: dict[str, Any] | None = None,
    window_sums: dict[str, Any] | None = None,
    rng_ranks: list[dict[str, Any]] | None = None,
) -> Path:
    """Save the model and all a resume needs (:func:`resume_training` reads it back) into ``directory``.

    A distributed run (:mod:`hopformer.train.distributed`) passes what it gathered from every rank: the optimiser
    state as a single process keys it, the training window's summed sums and each rank's RNG state."""
    values = {
        "step": state.step,
        "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
        "data": stream.state_dict(),
        "rng": rng_state(),
        f"best_val_{metric}": state.best,  # the validation score that picks best/
        "schedule": {"name": config.optim.schedule, "lr": learning_rate(state.step, config)},
        "window": state.window.sums() if window_sums is None else window_sums,
    }
    if rng_ranks is not None:
        values["rng_ranks"] = rng_ranks
    return save_checkpoint(directory, model, values)


def resume_training(
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    stream: Any,
    steps: int,
    metric: str = "accuracy",
    parallel: Any = None,
) -> tuple[TrainState, Path]:
    """Load ``run_dir/last`` into the model, optimiser, data order and RNGs; returns the state and the folder.

    ``parallel`` (a :class:`~hopformer.train.distributed.Parallel`): this process's place in a distributed run,
    which loads weights and optimiser state into a wrapped or sharded model; the checkpoint may come from any
    number of processes.

    Raises:
        FileNotFoundError: the run has no ``last/`` checkpoint.
        ValueError: the run is past ``steps``.
    """
    found = find_checkpoint(run_dir / "last")
    if found is None:
        raise FileNotFoundError(f"--resume {run_dir}: no checkpoint in {run_dir / 'last'}")
    state = load_state(found)
    path = found / STATE_NAME
    check_state(state, path, metric)
    if state["step"] > steps:
        raise ValueError(f"train.steps={steps} is below the step {state['step']} this run has reached")
    if parallel is not None and parallel.active:
        return _resume_distributed(found, state, model, optimizer, stream, metric, parallel), found
    load_weights(model, found)
    try:
        optimizer.load_state_dict(state["optimizer"])
        stream.load_state_dict(state["data"])
        set_rng_state(state["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as error:
        raise file_error(path, "its optimiser, data order or RNG state does not fit this run", error) from None
    return TrainState(state["step"], state.get(f"best_val_{metric}"), Window(state.get("window", {}))), found


def _resume_distributed(found, state, model, optimizer, stream, metric, parallel) -> TrainState:
    device = next(model.parameters()).device
    parallel.load_model_state(model, read_weights(Path(found) / WEIGHTS_NAME, device))
    parallel.load_optimizer_state(model, optimizer, state["optimizer"])
    stream.load_state_dict(state["data"])
    ranks = state.get("rng_ranks")
    if ranks is not None and len(ranks) == parallel.world:  # the same world: every rank's own RNG continues
        set_rng_state(ranks[parallel.rank])
    else:  # another world size: rank 0 continues rank 0's (a single process's) RNG, the others draw anew
        set_rng_state(state["rng"])
        if not parallel.main:
            torch.manual_seed(int(state["step"]) * 1_000_003 + parallel.rank)
    window = Window(state.get("window", {}) if parallel.main else {})  # the summed window, counted once
    return TrainState(int(state["step"]), state.get(f"best_val_{metric}"), window)
