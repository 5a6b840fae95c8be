"""Configs: every file shipped in ``configs/`` (and the device-only ones in ``experiments/configs/``) loads and
passes the trainer's checks; the packaged default, ``base:`` inheritance, and the keys that moved since 0.1."""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path

import pytest

from hopformer.attention import build as build_attention
from hopformer.models import EncoderConfig
from hopformer.train.build import check_config
from hopformer.train.config import Config, HeadConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted([*(ROOT / "configs").rglob("*.yaml"), *(ROOT / "experiments" / "configs").rglob("*.yaml")])


def test_configs_are_found():
    assert len(CONFIGS) >= 13, [c.name for c in CONFIGS]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_shipped_config_loads_and_checks(path):
    config = load_config(path)
    check_config(config)
    assert config.task, f"{path}: no task"
    assert config.train.eval_every <= config.train.steps


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_shipped_config_attention_options_build(path):
    """A misspelt or misplaced attention option fails here, not hours into a run."""
    model = load_config(path).model
    attention = build_attention(model.attention, model.dim, model.heads, **model.attention_options)
    for key, value in model.attention_options.items():
        if hasattr(attention, key) and key != "backend":
            assert getattr(attention, key) == value, (key, getattr(attention, key), value)


def test_the_packaged_default_is_configs_listops_small():
    """``hopformer train`` without ``--config`` reads the package's own default, never the repository; the
    repository's ``configs/listops_small.yaml`` must say the same."""
    repository = load_config(ROOT / "configs" / "listops_small.yaml")
    assert load_config() == repository
    assert load_config().train.steps == 6000 and load_config().data.max_length == 128  # not the dataclass defaults


def test_the_model_section_is_the_encoder_config_with_the_task_parts_open():
    config = Config()
    assert type(config.model) is EncoderConfig and type(config.head) is HeadConfig
    open_parts = (config.model.vocab_size, config.model.max_len, config.model.pad_id, config.model.pad_to_multiple)
    assert open_parts == (None, None, None, None)
    assert (config.head.pooling, config.head.head_dim) == ("mean", None)
    shared = {f.name for f in fields(EncoderConfig)} - {"vocab_size", "max_len", "pad_id", "pad_to_multiple"}
    library = EncoderConfig(vocab_size=10)
    assert {name: getattr(config.model, name) for name in shared} == {name: getattr(library, name) for name in shared}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_chains_merge_mappings_key_by_key(tmp_path):
    write(tmp_path / "common" / "root.yaml", "task: text\nmodel: {dim: 32, attention: diffuser, attention_options: "
          "{hops: 2, alpha: 0.2}}\ntrain: {steps: 50, seed: 3}\n")  # fmt: skip
    write(tmp_path / "common" / "middle.yaml", "base: root.yaml\nmodel: {attention_options: {hops: 3}}\n")
    child = write(
        tmp_path / "child.yaml", "base: common/middle.yaml\ntrain: {steps: 80}\noptim: {betas: [0.9, 0.95]}\n"
    )
    config = load_config(child, {"model.attention_options.alpha": 0.5, "train.seed": 4})
    assert config.task == "text" and config.model.dim == 32 and config.model.attention == "diffuser"
    assert config.model.attention_options == {"hops": 3, "alpha": 0.5}  # root's alpha, middle's hops, then --set
    assert (config.train.steps, config.train.seed, config.optim.betas) == (80, 4, (0.9, 0.95))
    assert config.data == Config().data  # what no file sets keeps the dataclass default
    # any other value replaces: a list is not merged item by item, a null replaces a mapping
    write(tmp_path / "betas.yaml", "base: child.yaml\noptim: {betas: [0.8, 0.9]}\nmodel: {attention_options: null}\n")
    replaced = load_config(tmp_path / "betas.yaml")
    assert replaced.optim.betas == (0.8, 0.9) and replaced.model.attention_options is None


def test_base_errors_name_the_files(tmp_path):
    a = write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: sub/c.yaml\n")
    write(tmp_path / "sub" / "c.yaml", "base: ../a.yaml\n")
    with pytest.raises(ValueError, match=r"cycle: .*a\.yaml -> .*b\.yaml -> .*c\.yaml -> .*a\.yaml"):
        load_config(a)
    write(tmp_path / "self.yaml", "base: self.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        load_config(tmp_path / "self.yaml")
    missing = write(tmp_path / "missing.yaml", "base: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"nowhere\.yaml does not exist \(the base: of .*missing\.yaml\)"):
        load_config(missing)
    write(tmp_path / "bad_base.yaml", "model: {dimm: 3}\n")
    child = write(tmp_path / "child.yaml", "base: bad_base.yaml\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['dimm'\] in .*bad_base\.yaml\.model"):
        load_config(child)
    write(tmp_path / "not_yaml.yaml", "model: {dim: [\n")
    with pytest.raises(ValueError, match=r"not_yaml\.yaml: not valid YAML"):
        load_config(write(tmp_path / "uses_it.yaml", "base: not_yaml.yaml\n"))
    with pytest.raises(ValueError, match=r"number\.yaml: base must be the path of a YAML config file, got 3"):
        load_config(write(tmp_path / "number.yaml", "base: 3\n"))


def test_legacy_head_keys_move_to_head_with_one_warning(tmp_path, caplog):
    old = write(tmp_path / "old.yaml", "model: {dim: 32, pooling: cls, head_dim: 24}\n")
    with caplog.at_level(logging.WARNING, logger="hopformer.train.config"):
        config = load_config(old)
    assert (config.head.pooling, config.head.head_dim, config.model.dim) == ("cls", 24, 32)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "model.pooling is now head.pooling" in lines[0] and "head.head_dim" in lines[0]
    assert str(old) in lines[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hopformer.train.config"):
        config = load_config(None, {"model.pooling": "cls"})  # --set with the old name
    assert config.head.pooling == "cls"
    assert len(caplog.records) == 1 and "head.pooling" in caplog.records[0].getMessage()
    # an old base under a new child: the child's new key wins, as any child key does
    child = write(tmp_path / "child.yaml", "base: old.yaml\nhead: {pooling: mean}\n")
    assert load_config(child).head == HeadConfig("mean", 24)
    with pytest.raises(ValueError, match="both model.pooling and head.pooling are set"):
        load_config(write(tmp_path / "both.yaml", "model: {pooling: cls}\nhead: {pooling: mean}\n"))
    assert Config().to_dict()["head"] == {"pooling": "mean", "head_dim": None, "tie_embeddings": True}
    assert "pooling" not in Config().to_dict()["model"]


def test_the_data_files_the_library_reads_are_declared_package_data():
    """What the library reads with importlib.resources must ship in a wheel, not only in a checkout."""
    import fnmatch
    import importlib.resources

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).resolve().parents[1]
    declared = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for package, name in (("hopformer.train", "default.yaml"), ("hopformer.train", "published_lra.yaml")):
        assert importlib.resources.files(package).joinpath(name).is_file()
        assert any(fnmatch.fnmatch(name, pattern) for pattern in declared.get(package, [])), (package, name)
