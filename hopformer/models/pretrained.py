"""Saving and loading models as Hugging Face does: a folder with ``config.json`` and ``model.safetensors``.

Every model is a :class:`PretrainedModel` built from a plain dataclass config; :func:`from_pretrained`
rebuilds any of them, the class named by ``model_type`` in ``config.json``. Weights are safetensors, so
loading never unpickles anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import typing
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from hopformer.checks import file_error

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_TYPES: dict[str, type[PretrainedModel]] = {}
"""``model_type`` -> model class; every :class:`PretrainedModel` subclass with a ``model_type`` is in it."""


class PretrainedModel(nn.Module):
    """Base of the models here: a ``config`` dataclass and HF-like save / load.

    Subclasses set ``config_class`` and ``model_type`` and implement ``from_config``.
    """

    config_class: ClassVar[type]
    model_type: ClassVar[str]
    config: Any

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "model_type" in vars(cls):  # every concrete model registers itself for from_pretrained
            MODEL_TYPES[cls.model_type] = cls

    @classmethod
    def from_config(cls, config: Any) -> PretrainedModel:
        raise NotImplementedError

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created), each atomically."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"model_type": self.model_type, **asdict(self.config)}
        atomic_write(directory / CONFIG_NAME, lambda path: path.write_text(json.dumps(config, indent=2) + "\n"))
        tensors, tied = {}, {}
        first: dict[tuple, str] = {}
        for name, tensor in self.state_dict().items():
            # tied weights (a causal LM's head and embedding) are one tensor: saved once, named in the metadata
            key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
            if tensor.numel() and key in first:
                tied[name] = first[key]
                continue
            first[key] = name
            tensors[name] = tensor.detach().contiguous().cpu()
        metadata = {"tied": json.dumps(tied)} if tied else None
        atomic_write(directory / WEIGHTS_NAME, lambda path: save_file(tensors, str(path), metadata=metadata))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> PretrainedModel:
        """Rebuild a model saved by :meth:`save_pretrained` (``cls`` must match the saved ``model_type``)."""
        model = from_pretrained(directory, device)
        if not isinstance(model, cls):
            raise TypeError(f"{directory} holds a {type(model).__name__}, not a {cls.__name__}")
        return model


def config_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Build a (nested) model config dataclass from a dict; unknown keys raise ``ValueError``."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; allowed: {sorted(names)}")
    values = dict(values)
    hints = typing.get_type_hints(cls)
    for name, value in values.items():  # nested configs (a classifier's encoder) come as dicts
        nested = hints.get(name)
        if isinstance(value, dict) and dataclasses.is_dataclass(nested):
            values[name] = config_from_dict(nested, value)
    return cls(**values)


def from_pretrained(directory: str | os.PathLike, device: str | torch.device = "cpu") -> PretrainedModel:
    """Load any model saved by :meth:`PretrainedModel.save_pretrained` (the class comes from ``config.json``)."""
    directory = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} has no {name}; expected a folder written by save_pretrained")
    config_path = directory / CONFIG_NAME
    try:
        values = json.loads(config_path.read_bytes().decode("utf-8"))
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise file_error(config_path, "not a valid model config (JSON)", error) from None
    if not isinstance(values, dict):
        raise file_error(config_path, f"a model config must be a JSON object, got a {type(values).__name__}")
    model_type = values.pop("model_type", None)
    if model_type not in MODEL_TYPES:
        raise file_error(config_path, f"model_type={model_type!r}; known: {sorted(MODEL_TYPES)}")
    cls = MODEL_TYPES[model_type]
    try:
        model = cls.from_config(config_from_dict(cls.config_class, values))
    except (TypeError, ValueError) as error:
        raise file_error(config_path, "settings that build no model", error) from None
    load_into(model, read_weights(directory / WEIGHTS_NAME), directory / WEIGHTS_NAME)
    return model.to(device)


def load_into(model: nn.Module, weights: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """``model.load_state_dict(weights)``; weights that do not fit the model are an error naming ``path``."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:  # missing or unexpected keys, shape mismatches
        raise file_error(path, f"its weights do not fit the {type(model).__name__}", error) from None


def read_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a ``model.safetensors`` written by :meth:`PretrainedModel.save_pretrained`, tied weights
    restored under every name they had (a state dict ``load_state_dict`` takes)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    tensors = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as weights:
            tied = json.loads((weights.metadata() or {}).get("tied", "{}"))
            for name in weights.keys():  # noqa: SIM118 (safe_open has keys(), not iteration)
                tensors[name] = weights.get_tensor(name)
        if not isinstance(tied, dict) or any(source not in tensors for source in tied.values()):
            raise ValueError(f"the 'tied' metadata names tensors the file does not hold: {tied!r}")
    except (SafetensorError, ValueError, OSError, RuntimeError) as error:  # truncated, garbage, or not safetensors
        raise file_error(path, "not a readable safetensors file (truncated or damaged?)", error) from None
    for name, source in tied.items():
        tensors[name] = tensors[source]
    return tensors


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(temp_path)`` on a temporary file in ``path``'s folder, then rename it over ``path``.

    Readers see the old file or the new one, never a partial one; a failed write leaves no temp file.
    """
    path = Path(path)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temp = Path(temp)
    try:
        write(temp)
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with open(temp, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
