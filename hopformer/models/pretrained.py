"""Saving and loading models in Hugging Face's folder format: ``config.json`` and ``model.safetensors``.

Every model is a :class:`PretrainedModel` built from a plain dataclass config; :func:`from_pretrained`
rebuilds any of them, the class named in ``config.json``. The folder is the one ``transformers`` reads and
writes for :mod:`hopformer.hf`'s classes (:mod:`hopformer.models.hf_format`): a run's checkpoint loads with
``transformers.AutoModelForSequenceClassification.from_pretrained``, and a model saved by ``transformers``
loads here. Weights are safetensors, so loading never unpickles anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import typing
from dataclasses import fields
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

    def save_pretrained(self, directory: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created), each atomically;
        ``state_dict``: the weights to write (default the model's own; a sharded model's gathered ones)."""
        from safetensors.torch import save_file

        from hopformer.models import hf_format

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = hf_format.to_hf_config(self.model_type, self.config)
        atomic_write(directory / CONFIG_NAME, lambda path: path.write_text(json.dumps(config, indent=2) + "\n"))
        tensors, tied = {}, {}
        first: dict[tuple, str] = {}
        state_dict = self.state_dict() if state_dict is None else state_dict
        for name, tensor in hf_format.weights_to_folder(self.model_type, state_dict).items():
            # tied weights (a causal LM's head and embedding) are one tensor: saved once, named in the metadata
            key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
            if tensor.numel() and key in first:
                tied[name] = first[key]
                continue
            first[key] = name
            tensors[name] = tensor.detach().contiguous().cpu()
        metadata = {"format": "pt", **({"tied": json.dumps(tied)} if tied else {})}  # "pt": transformers asks
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
    from hopformer.models import hf_format

    config_path = directory / CONFIG_NAME
    try:
        values = json.loads(config_path.read_bytes().decode("utf-8"))
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise file_error(config_path, "not a valid model config (JSON)", error) from None
    if not isinstance(values, dict):
        raise file_error(config_path, f"a model config must be a JSON object, got a {type(values).__name__}")
    hf = hf_format.is_hf_config(values)
    # the transformers format names the class hopformer_class; that of hopformer 0.1 names it model_type
    model_type = hf_format.hopformer_class(values) if hf else values.pop("model_type", None)
    if model_type not in MODEL_TYPES:
        known = "hopformer_class" if hf else "model_type"
        raise file_error(config_path, f"{known}={model_type!r}; known: {sorted(MODEL_TYPES)}")
    try:
        if hf:
            config = hf_format.from_hf_config(values)[1]
        else:
            config = config_from_dict(MODEL_TYPES[model_type].config_class, values)
        model = MODEL_TYPES[model_type].from_config(config)
    except (TypeError, ValueError, KeyError) as error:
        raise file_error(config_path, "settings that build no model", error) from None
    weights_path = directory / WEIGHTS_NAME
    load_into(model, hf_format.weights_from_folder(model_type, read_weights(weights_path)), weights_path)
    return model.to(device)


def load_weights_into(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(tensors)`` (strict), where a weight the model ties to another (a causal LM's output
    layer and its embedding) may be absent: ``transformers`` stores a tied weight once, under either name."""
    names: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), []).append(name)
    tensors = dict(tensors)
    for group in names.values():
        present = [name for name in group if name in tensors]
        for name in group:
            if present and name not in tensors:
                tensors[name] = tensors[present[0]]
    model.load_state_dict(tensors)


def load_into(model: nn.Module, weights: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """:func:`load_weights_into`; weights that do not fit the model are an error naming ``path``."""
    try:
        load_weights_into(model, weights)
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
