"""Training: the config, tasks, the loop and its parts, checkpoints, LRA grids and run reports.

``train(config)`` runs one experiment (:mod:`hopformer.train.loop`); ``load_config(path, overrides)`` reads
a YAML config (:mod:`hopformer.train.config`). The loop's parts, one concern each: :mod:`~.build` (device,
checks, the model), :mod:`~.batches` (data order and batches), :mod:`~.optim` (AdamW and the schedule),
:mod:`~.evaluation`, :mod:`~.metrics`, :mod:`~.checkpoint` (save and resume), :mod:`~.control` (time
limits and signals). :mod:`~.grid` runs LRA grids and :mod:`~.report` compares run folders; the command
line lives in :mod:`hopformer.cli`. Names are imported lazily so ``import hopformer.train`` stays light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Config": "config",
    "HeadConfig": "config",
    "load_config": "config",
    "save_config": "config",
    "train": "loop",
    "TrainResult": "loop",
    "evaluate": "evaluation",
    "learning_rate": "optim",
    "BatchStream": "batches",
    "load_task": "tasks",
    "TASKS": "tasks",
    "save_checkpoint": "checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hopformer.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"hopformer.train.{_EXPORTS[name]}"), name)
