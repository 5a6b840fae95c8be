"""``experiments/check_config_inheritance.py``: the ``base:`` merge, and every shipped config resolved through it.

Until the loader reads ``base:`` itself, this is what checks the shortened configs (and the device-only ones in
``experiments/configs/``, which tests/test_configs.py does not see): each resolves, builds and passes the
trainer's checks, and resolves to the mapping its file held before it was shortened."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
from hopformer.train.trainer import _check_config

from hopformer.attention import build as build_attention
from hopformer.train.config import Config, from_dict


def _load_checker():
    path = Path(__file__).resolve().parents[1] / "check_config_inheritance.py"
    spec = importlib.util.spec_from_file_location("check_config_inheritance", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


checker = _load_checker()
CONFIGS = checker.shipped_configs()
IDS = [p.relative_to(checker.ROOT).as_posix() for p in CONFIGS]


def test_merge_merges_mappings_and_replaces_everything_else(tmp_path):
    (tmp_path / "sub").mkdir()
    root = "model: {dim: 64, options: {a: 1, b: 2}}\noptim: {betas: [0.9, 0.98]}\nseed: 0\n"
    (tmp_path / "root.yaml").write_text(root)
    (tmp_path / "sub" / "mid.yaml").write_text("base: ../root.yaml\nmodel: {options: {b: 3}}\noptim: {betas: [0.5]}\n")
    (tmp_path / "sub" / "leaf.yaml").write_text("base: mid.yaml\nseed: 7\nmodel: {dim: 32}\n")
    assert checker.resolve(tmp_path / "sub" / "leaf.yaml") == {
        "model": {"dim": 32, "options": {"a": 1, "b": 3}},
        "optim": {"betas": [0.5]},  # a list replaces, it is not merged
        "seed": 7,
    }


def test_a_base_chain_that_loops_is_named(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="base chain loops"):
        checker.resolve(tmp_path / "a.yaml")


def test_configs_are_found():
    assert len(CONFIGS) >= 15, IDS
    assert any("base" in (p.read_text()) for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_resolved_config_builds_and_checks(path):
    config = from_dict(checker.resolve(path), Config, where=str(path))
    _check_config(config)
    assert config.task and config.train.eval_every <= config.train.steps
    model = config.model
    build_attention(model.attention, model.dim, model.heads, **model.attention_options)


def _has_ref(ref: str) -> bool:
    if shutil.which("git") is None:
        return False
    done = subprocess.run(["git", "rev-parse", "--verify", "--quiet", ref], cwd=checker.ROOT, capture_output=True)
    return done.returncode == 0


@pytest.mark.skipif(not _has_ref("baseline-pre-house"), reason="needs git and the baseline-pre-house tag")
@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_resolved_config_equals_the_file_before_it_was_shortened(path):
    rel = path.relative_to(checker.ROOT).as_posix()
    assert checker.differences(checker.resolve(path), checker.original(rel, "baseline-pre-house")) == []
