"""Training: config, tasks, the loop, checkpoints, and the ``train`` / ``eval`` / ``lra`` verbs.

``train(config)`` runs one experiment (see :mod:`hopformer.train.trainer`); ``load_config(path,
overrides)`` reads a YAML config. Names are imported lazily so ``import hopformer.train`` stays light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Config": "config",
    "load_config": "config",
    "save_config": "config",
    "train": "trainer",
    "evaluate": "trainer",
    "learning_rate": "trainer",
    "BatchStream": "trainer",
    "TrainResult": "trainer",
    "load_task": "tasks",
    "TASKS": "tasks",
    "save_checkpoint": "checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hopformer.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"hopformer.train.{_EXPORTS[name]}"), name)
