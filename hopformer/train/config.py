"""Training configuration: plain dataclasses, read from YAML, overridden from the command line.

A config file has these sections; every key is optional and unknown keys are errors::

    base: small.yaml         # optional: the config this one starts from (a path relative to this file)
    task: listops            # listops | text | retrieval | image | pathfinder32 (or lra-<name>)
    data:  {data_dir, max_length, pad_to_multiple, generate: {train, val, test, min_length, max_length, seed}}
    model: {dim, depth, heads, mlp_dim, attention, attention_options, norm, positions, dropout, ...}
    head:  {pooling, head_dim}
    optim: {lr, betas, eps, weight_decay, warmup_steps, schedule, min_lr_ratio, grad_clip}
    train: {steps, batch_size, grad_accum, eval_every, log_every, seed, device, precision, run_dir, ...}

``model`` is the encoder's own config, :class:`hopformer.models.EncoderConfig`; what the task decides
(``vocab_size``, ``max_len``, ``pad_id``, ``pad_to_multiple``) is None until the trainer fills it.

``base:`` chains: the base is read (with its own base, and so on), then this file's keys are merged
over it (mappings key by key, any other value replaces), then the overrides. Overrides are dotted paths
(``model.attention=diffuser``); values are parsed as YAML scalars, so ``true``, ``1e-3`` and
``[0.9, 0.98]`` mean what they look like. The resolved config is saved as ``config.yaml`` in every run
folder and is enough to resume or re-run it.

Settings that moved since 0.1 (:data:`LEGACY_KEYS`: ``model.pooling`` and ``model.head_dim`` are now in
``head:``) are still read, from files, overrides and old run folders, with one warning line.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from hopformer.checks import FileFormatError, file_error
from hopformer.models.encoder import EncoderConfig

CONFIG_NAME = "config.yaml"
"""The resolved config in every run folder."""
DEFAULT_CONFIG_NAME = "default.yaml"
"""The config of a run given none: ``hopformer/train/default.yaml``, shipped in the package (the small
ListOps run that learns on a CPU in minutes)."""
BYTES_DEFAULT_CONFIG_NAME = "default_bytes.yaml"
"""The config of a ``bytes`` task given none: a small causal byte LM that learns on a CPU in minutes."""
LEGACY_KEYS = {"model.pooling": "head.pooling", "model.head_dim": "head.head_dim"}
"""Settings that changed place: old dotted name -> new one (see :func:`migrate_legacy_keys`)."""

_log = logging.getLogger(__name__)


@dataclass
class GenerateConfig:
    """ListOps generated when the data folder has none (``hopformer data listops`` settings)."""

    train: int = 4000
    val: int = 500
    test: int = 500
    min_length: int = 20
    max_length: int = 200
    seed: int = 0
    max_depth: int = 10  # the released generator's; shallower trees are easier
    max_args: int = 10


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


def model_defaults() -> EncoderConfig:
    """The encoder settings of a run before its task is known: the trainer fills what is None."""
    return EncoderConfig(vocab_size=None, max_len=None, pad_id=None, pad_to_multiple=None)


@dataclass
class HeadConfig:
    """The head on the encoder: a :class:`~hopformer.models.SequenceClassifier` (a
    :class:`~hopformer.models.DualEncoderClassifier` for pair tasks), or for the causal objective the
    next-token layer of a :class:`~hopformer.models.CausalLM`.

    ``pooling``: ``"mean"`` over real tokens or ``"cls"`` (a learned vector prepended at position 0).
    ``head_dim``: hidden width of the head's MLP; None = the encoder's ``mlp_dim``.
    ``tie_embeddings``: the causal LM's output layer shares the token embedding's weights.
    """

    pooling: str = "mean"
    head_dim: int | None = None
    tie_embeddings: bool = True


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
    ``objective``: ``"classify"`` (the task's labels), ``"masked"`` (masked-LM: ``mask_rate`` of the real
    tokens are hidden and predicted from the rest; ``mask_policy="bert"`` shows the mask id at 80% of them, a
    random token at 10% and the token itself at 10%, ``"mask"`` the mask id at all; on an example task this is
    self-pretraining scored by accuracy over the hidden tokens, on a corpus a masked LM scored in bits per
    hidden character) or ``"causal"`` (next-token prediction on a corpus or image set, scored in bits per
    byte, bits per character, perplexity or bits per dimension).
    ``init_from``: a run (its ``best/`` checkpoint) or checkpoint folder whose encoder weights start this
    run, e.g. a ``masked`` run before a ``classify`` one on the same task.
    ``parallel``: under ``torchrun`` with several processes, ``"ddp"`` (DistributedDataParallel) or ``"fsdp"``
    (FSDP2, ``fully_shard`` per block); ``batch_size`` stays the global batch (see
    :mod:`hopformer.train.distributed`). A single process ignores it.
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
    mask_policy: str = "bert"
    init_from: str | None = None
    parallel: str = "ddp"


@dataclass
class Config:
    """A whole training run.

    ``model`` is the encoder's config; in it, None for ``vocab_size``, ``max_len``, ``pad_id`` and
    ``pad_to_multiple`` means "from the task": its vocabulary (plus a mask id for the masked objective),
    the longest sequence of its data rounded up to 128 (plus the CLS vector), 0 for tokens and no padding
    id for pixels, and ``data.pad_to_multiple`` (itself None = 1 for full attention, 128 otherwise).
    """

    task: str = "listops"
    data: DataConfig = field(default_factory=DataConfig)
    model: EncoderConfig = field(default_factory=model_defaults)
    head: HeadConfig = field(default_factory=HeadConfig)
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
    """Build ``cls`` (default-constructible) from a nested dict, checking every key and the type of every value.

    Keys not given keep the defaults of ``cls()``, section by section (so ``model.max_len`` stays None,
    "from the data", unless it is set).
    """
    return _update(cls(), values, where)


def _update(default: Any, values: dict[str, Any] | None, where: str) -> Any:
    values = values or {}
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a mapping, got {values!r}")
    known = {f.name for f in fields(default)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(known)}")
    changes = {}
    for name, value in values.items():
        current = getattr(default, name)
        if dataclasses.is_dataclass(current):
            changes[name] = _update(current, value, f"{where}.{name}")
        else:
            changes[name] = _coerce(value, current, f"{where}.{name}")
    return dataclasses.replace(default, **changes)


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
    """Read a YAML config and apply dotted ``overrides``.

    Args:
        path: a config file (its ``base:`` chain followed, see :func:`read_config_file`); None = the
            packaged default (:data:`DEFAULT_CONFIG_NAME`, or :data:`BYTES_DEFAULT_CONFIG_NAME` when the
            overrides set a corpus or image task: ``bytes``, ``enwik8:DIR``, ``cifar10-pixels:DIR``...).
        overrides: ``{"model.attention": "diffuser", ...}``, applied after the file(s).

    Raises:
        FileNotFoundError: the file, or a base it names, does not exist.
        ValueError: a file is not a mapping, names an unknown key or a wrong value, or the bases form a cycle;
            the message names the file.
    """
    if path is None:
        from hopformer.train.tasks import is_corpus_task  # here: tasks reads this module

        task = str((overrides or {}).get("task", ""))
        name = BYTES_DEFAULT_CONFIG_NAME if is_corpus_task(task) else DEFAULT_CONFIG_NAME
        where = f"hopformer/train/{name}"
        values = _parse(importlib.resources.files("hopformer.train").joinpath(name).read_text(), where)
    else:
        where = str(path)
        values = read_config_file(path)
    from_dict(values, Config, where=where)  # the file alone: its errors name the file
    overrides = migrate_legacy_keys(dict(overrides or {}), OVERRIDES)
    for key, value in overrides.items():
        check_override(key, value)  # the overrides' errors name --set and the key
        set_dotted(values, key, value)
    return from_dict(values, Config, where=OVERRIDES if overrides else where)


OVERRIDES = "--set"
"""How errors name the command-line overrides (``--set KEY=VALUE`` and the flags that stand for settings)."""


def check_override(key: str, value: Any) -> None:
    """A dotted override must name a setting and have a value of its kind; ``ValueError`` naming ``--set``.

    Free-form mappings (``model.attention_options``) take any key below them; their values are checked
    where they are used.
    """
    if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
        raise ValueError(f"{OVERRIDES} {key!r}: expected a dotted setting name such as model.dim")
    node: Any = Config()
    parts = key.split(".")
    for index, part in enumerate(parts):
        section = ".".join(parts[:index]) or "the config"
        if isinstance(node, dict):  # attention_options and the like: free-form below this point
            return
        if not dataclasses.is_dataclass(node):
            raise ValueError(f"{OVERRIDES} {key}={value!r}: {section} is a setting, not a section")
        names = [f.name for f in fields(node)]
        if part not in names:
            raise ValueError(f"{OVERRIDES} {key}={value!r}: {section} has no setting {part!r}; it has {sorted(names)}")
        node = getattr(node, part)
    if dataclasses.is_dataclass(node):
        if not isinstance(value, dict):
            raise ValueError(f"{OVERRIDES} {key}={value!r}: {key} is a section; set one of its keys ({key}.KEY=VALUE)")
        _update(node, value, f"{OVERRIDES} {key}")
        return
    _coerce(value, node, f"{OVERRIDES} {key}")


def read_config_file(path: str | os.PathLike, _named_by: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The settings of a config file as a nested dict, its ``base:`` chain merged in.

    ``base: other.yaml`` (relative to this file) is read first, recursively; this file's keys are then
    merged over it by :func:`merge_settings`. Each file's keys are checked on their own, so an error names
    the file that holds the bad key.
    """
    path = Path(path).expanduser()
    chain = [*_named_by, path]
    if path.resolve() in {named.resolve() for named in _named_by}:
        raise ValueError(f"config files name each other as base in a cycle: {' -> '.join(map(str, chain))}")
    if not path.is_file():
        named = f" (the base: of {_named_by[-1]})" if _named_by else ""
        raise FileNotFoundError(f"config file {path} does not exist{named}")
    values = migrate_legacy_keys(read_yaml_file(path), str(path))
    base = values.pop("base", None)
    from_dict(values, Config, where=str(path))
    if base is None:
        return values
    if not isinstance(base, str) or not base.strip():
        raise ValueError(f"{path}: base must be the path of a YAML config file, got {base!r}")
    return merge_settings(read_config_file(path.parent / Path(base).expanduser(), tuple(chain)), values)


def read_yaml_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping a YAML config file holds (empty for an empty file); a file that is not UTF-8, not YAML or
    not a mapping is a :class:`~hopformer.checks.FileFormatError` naming it."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise file_error(path, "not a YAML config: the text is not UTF-8", error) from None
    return _parse(text, str(path))


def _parse(text: str, where: str) -> dict[str, Any]:
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise FileFormatError(f"{where}: not valid YAML: {' '.join(str(error).split())}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise FileFormatError(f"{where}: a config file must hold a mapping, got {type(values).__name__}")
    return values


def merge_settings(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` laid over ``base``: mappings merged key by key (recursively), any other value replaces."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_settings(merged[key], value)
        else:
            merged[key] = value
    return merged


def migrate_legacy_keys(values: dict[str, Any], where: str, warn: bool = True) -> dict[str, Any]:
    """Move settings named as before (:data:`LEGACY_KEYS`) to their new place, with one warning line.

    ``values`` is a config file's nested mapping or a dict of dotted overrides; it is changed in place and
    returned. Giving a setting under both names is an error.
    """
    moved = []
    for old, new in LEGACY_KEYS.items():
        (section, key), (new_section, new_key) = old.split("."), new.split(".")
        if old in values:  # a dotted override
            target, found, value = values, new, values.pop(old)
        elif isinstance(values.get(section), dict) and key in values[section]:
            if values.get(new_section) is None:
                values[new_section] = {}
            target, found, value = values[new_section], new_key, values[section].pop(key)
            if not isinstance(target, dict):
                raise ValueError(f"{where}: {new_section} must be a mapping, got {target!r}")
        else:
            continue
        if found in target:
            raise ValueError(f"{where}: both {old} and {new} are set; {old} is the old name of {new}, keep only {new}")
        target[found] = value
        moved.append((old, new))
    if moved and warn:
        renames = ", ".join(f"{old} is now {new}" for old, new in moved)
        _log.warning("%s: %s (the old names still work, with this warning; use the new ones)", where, renames)
    return values


def with_overrides(config: Config, overrides: dict[str, Any], where: str = "overrides") -> Config:
    """A copy of ``config`` with dotted ``overrides`` applied (and checked, as :func:`load_config` does)."""
    values = config.to_dict()
    for key, value in migrate_legacy_keys(dict(overrides), where).items():
        set_dotted(values, key, value)
    return from_dict(values, Config, where=where)


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
    from hopformer.models.pretrained import atomic_write

    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    atomic_write(Path(path), lambda temp: temp.write_text(text))
