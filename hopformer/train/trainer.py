"""Deprecated: the trainer of hopformer 0.1 now lives in several modules of :mod:`hopformer.train`.

Kept so the scripts in ``benchmarks/`` keep running until they import from the new places
(``loop``, ``batches``, ``build``, ``evaluation``, ``optim``); new code must not import it.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch

from hopformer.train.batches import BatchStream, Runtime, masking, max_tokens, prefix_length
from hopformer.train.batches import next_training_batch as _augmented
from hopformer.train.build import build_model as _build_model
from hopformer.train.config import Config
from hopformer.train.evaluation import evaluate, objective_loss
from hopformer.train.loop import TrainResult, train
from hopformer.train.optim import learning_rate, make_optimizer
from hopformer.train.tasks import TaskData

__all__ = [
    "BatchStream",
    "Runtime",
    "TrainResult",
    "_augmented",
    "build_model",
    "evaluate",
    "learning_rate",
    "make_optimizer",
    "masking",
    "max_tokens",
    "objective_loss",
    "prefix_length",
    "train",
]

warnings.warn(
    "hopformer.train.trainer is deprecated; import from hopformer.train (loop, batches, build, optim, evaluation)",
    DeprecationWarning,
    stacklevel=2,
)


def build_model(config: Config, data: TaskData, pad_to_multiple: int) -> torch.nn.Module:
    """0.1's ``build_model(config, data, pad)``: :func:`hopformer.train.build.build_model` with that padding."""
    model = replace(config.model, pad_to_multiple=config.model.pad_to_multiple or pad_to_multiple)
    return _build_model(replace(config, model=model), data)
