"""Training configuration: plain dataclasses, read from YAML, overridden from the command line.

A config file has five sections; every key is optional and unknown keys are errors::

    task: listops            # listops | text | retrieval | image | pathfinder32 (or lra-<name>)
    data:  {data_dir, max_length, pad_to_multiple, generate: {train, val, test, min_length, max_length, seed}}
    model: {dim, depth, heads, mlp_dim, attention, attention_options, norm, positions, pooling, ...}
    optim: {lr, betas, eps, weight_decay, warmup_steps, schedule, min_lr_ratio, grad_clip}
    train: {steps, batch_size, grad_accum, eval_every, log_every, seed, device, precision, run_dir, ...}

Overrides are dotted paths (``model.attention=diffuser``); values are parsed as YAML scalars, so
``true``, ``1e-3`` and ``[0.9, 0.98]`` mean what they look like. The resolved config is saved as
``config.yaml`` in every run folder and is enough to resume or re-run it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "listops_small.yaml"


@dataclass
class GenerateConfig:
    """ListOps generated when the data folder has none (``hopformer data listops`` settings)."""

    train: int = 4000
    val: int = 500
    test: int = 500
    min_length: int = 20
    max_length: int = 200
    seed: int = 0


@dataclass
class DataConfig:
    """Where the data is and how batches are cut.

    ``data_dir``: a folder with ``basic_{train,val,test}.tsv`` (ListOps) or the LRA release folder;
    None = a cache folder under ``~/.cache/hopformer`` (``$HOPFORMER_CACHE``) for generated ListOps.
    ``max_length``: sequences are cut to this many tokens. ``pad_to_multiple``: batch width rounded
    up to this; None = 1 for full attention, 128 (FlexAttention tiles) for graph attentions.
    ``bucket``: draw each batch from examples of similar length (less padding; still seeded).
    ``mask_black_pixels``: pixel tasks only. Off (default), every pixel is a real token. On, black
    pixels (id 0) are masked out of attention and pooling, as the official LRA encoders do
    (``src_padding_mask = inputs > 0``; the Nystromformer port likewise): the setting of the published
    Image and Pathfinder numbers, for comparing with them (specs/lra.md §5).
    ``augment``: ``"none"`` (default) or ``"dihedral"`` (Pathfinder only: each training image is
    turned and flipped by one of the square's 8 symmetries, drawn per example and step from the seed;
    the label does not change). Not part of the LRA protocol: say so when reporting.
    ``pathfinder_difficulty``: the Pathfinder folder read, ``curv_contour_length_14`` (LRA's "hard"
    one, the default), ``curv_contour_length_9`` or ``curv_baseline``.
    """

    data_dir: str | None = None
    max_length: int = 2000
    pad_to_multiple: int | None = None
    bucket: bool = True
    mask_black_pixels: bool = False
    augment: str = "none"
    pathfinder_difficulty: str = "curv_contour_length_14"
    generate: GenerateConfig = field(default_factory=GenerateConfig)


@dataclass
class ModelConfig:
    """The classifier (see :class:`hopformer.models.TransformerEncoder`); ``max_len`` None = from the data."""

    dim: int = 64
    depth: int = 2
    heads: int = 2
    mlp_dim: int = 128
    max_len: int | None = None
    attention: str = "full"
    attention_options: dict[str, Any] = field(default_factory=dict)
    norm: str = "pre"
    positions: str = "learned"
    pooling: str = "mean"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    head_dim: int | None = None
    gradient_checkpointing: bool = False
    init: str = "normal"  # "normal" (N(0, 0.02)) or "torch" (PyTorch's Linear default); see TransformerEncoder
    embedding: str = "table"  # pixel tasks: "intensity" (grey levels, linear) or "conv" (3x3); see TransformerEncoder
    stem_depth: int = 1  # embedding "conv": 3x3 convolutions in the stem (16 channels, GELU between)


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule: linear warmup, then ``schedule`` decay to ``min_lr_ratio * lr``.

    ``schedule``: ``"linear"``, ``"cosine"``, ``"constant"`` or ``"rsqrt"`` (LRA's ``lr * sqrt(warmup / step)``).
    ``grad_clip``: max global gradient norm (0 = off).
    ``hop_lr_scale``: the learning rate of Diffuser's learned hop weights (``learned_coefficients``) as a
    multiple of ``lr``, as GPR-GNN gives its hop weights their own rate; at 1 they stayed within 0.02 of their
    PPR start over 8,000 ListOps steps at lr 3e-4.
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.01
    warmup_steps: int = 100
    schedule: str = "linear"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    hop_lr_scale: float = 1.0


@dataclass
class TrainConfig:
    """The loop. ``batch_size`` is per optimiser step (split in ``grad_accum`` micro-batches).

    ``eval_every``: validate (and checkpoint) every this many steps; ``eval_batches`` None = all of val.
    ``checkpoint_every``: save ``last/`` this often (None = with every evaluation).
    ``device``: ``auto`` (CUDA when available), ``cpu`` or ``cuda``. ``precision``: ``auto`` (bf16
    autocast on CUDA, fp32 on CPU), ``bf16`` or ``fp32``. ``run_dir`` None = ``runs/<task>-<attention>-<time>``.
    ``time_limit_minutes``: stop cleanly (checkpoint ``last/``, return) before this much wall time has
    passed since :func:`~hopformer.train.train` was called (data loading included); None = no limit.
    Resume with ``--resume`` to continue exactly.
    ``objective``: ``"classify"`` (the task's labels) or ``"masked"`` (self-pretraining: ``mask_rate`` of
    the real tokens are replaced by a mask id and predicted from the rest; accuracy is over the
    hidden tokens). ``init_from``: a run (its ``best/`` checkpoint) or checkpoint folder whose encoder
    weights start this run, e.g. a ``masked`` run before a ``classify`` one on the same task.
    """

    steps: int = 1500
    batch_size: int = 32
    grad_accum: int = 1
    eval_every: int = 250
    eval_batches: int | None = None
    eval_batch_size: int | None = None
    checkpoint_every: int | None = None
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    run_dir: str | None = None
    progress: bool = True
    time_limit_minutes: float | None = None
    objective: str = "classify"
    mask_rate: float = 0.15
    init_from: str | None = None


@dataclass
class Config:
    """A whole training run."""

    task: str = "listops"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), as written to ``config.yaml``."""
        return _plain(asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def from_dict(values: dict[str, Any] | None, cls: type = Config, where: str = "config") -> Any:
    """Build ``cls`` from a nested dict, checking every key and the type of every value."""
    values = values or {}
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a mapping, got {values!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls(), name)  # every config class here has defaults
        if dataclasses.is_dataclass(default):
            kwargs[name] = from_dict(value, type(default), f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, default, f"{where}.{name}")
    return cls(**kwargs)


def _coerce(value: Any, default: Any, where: str) -> Any:
    """Check ``value`` against the kind of the default (ints may stand for floats; None for optionals)."""
    if value is None or default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, str):  # YAML 1.1 reads exponents without a dot (1e-3) as strings
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"{where} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
    elif isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(default):
            raise ValueError(f"{where} must be a list of {len(default)} numbers, got {value!r}")
        return tuple(float(item) for item in value)
    elif isinstance(default, dict) and not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping, got {value!r}")
    return value


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML config (``None`` = ``configs/listops_small.yaml``) and apply dotted ``overrides``."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if path.is_file():
        values = yaml.safe_load(path.read_text()) or {}
    elif path == DEFAULT_CONFIG:
        values = {}  # an installed package without the configs folder: the dataclass defaults are the same
    else:
        raise FileNotFoundError(f"config file {path} does not exist")
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config file must hold a mapping, got {type(values).__name__}")
    for key, value in (overrides or {}).items():
        set_dotted(values, key, value)
    return from_dict(values, Config, where=str(path))


def set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(d, "model.attention_options.hops", 3)`` sets ``d["model"]["attention_options"]["hops"]``."""
    parts = key.split(".")
    for part in parts[:-1]:
        child = values.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"cannot set {key!r}: {part!r} is not a section")
        values = child
    values[parts[-1]] = value


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, value)`` with the value parsed as a YAML scalar (``3`` -> 3, ``true`` -> True)."""
    if "=" not in text:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"expected KEY=VALUE with a non-empty key, got {text!r}")
    return key, yaml.safe_load(raw) if raw.strip() else ""


def save_config(config: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (the form :func:`load_config` reads back)."""
    from hopformer.models.transformer import atomic_write

    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    atomic_write(Path(path), lambda temp: temp.write_text(text))
