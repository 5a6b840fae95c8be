"""Every config file shipped in ``configs/`` loads and passes the trainer's checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from hopformer.attention import build as build_attention
from hopformer.train.build import check_config
from hopformer.train.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_configs_are_found():
    assert len(CONFIGS) >= 13, [c.name for c in CONFIGS]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_shipped_config_loads_and_checks(path):
    config = load_config(path)
    check_config(config)
    assert config.task, f"{path}: no task"
    assert config.train.eval_every <= config.train.steps


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_shipped_config_attention_options_build(path):
    """A misspelt or misplaced attention option fails here, not hours into a run."""
    model = load_config(path).model
    attention = build_attention(model.attention, model.dim, model.heads, **model.attention_options)
    for key, value in model.attention_options.items():
        if hasattr(attention, key) and key != "backend":
            assert getattr(attention, key) == value, (key, getattr(attention, key), value)
