"""Checkpoints: a folder per checkpoint (``last/``, ``best/``) inside the run folder.

Each holds ``config.json`` + ``model.safetensors`` (so ``hopformer.models.from_pretrained`` reads it)
and ``state.pt``: optimiser, step, RNG states, data-order position, best metric. ``state.pt`` holds
only tensors and plain containers, written with ``torch.save`` and read with ``weights_only=True``.

Atomicity: a checkpoint is written into a temporary folder beside its final place (every file there
written to a temp file and renamed), then swapped in with ``os.replace``; the previous one is
removed only after. A crash at any moment leaves either the old or the new checkpoint complete, and
no temporary files once the next save or load tidies up.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hopformer.models.transformer import atomic_write

STATE_NAME = "state.pt"


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA generator states as tensors and plain values (``weights_only``-safe)."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state(
        (numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["position"], numpy["has_gauss"], numpy["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: str | os.PathLike, model: Any, state: dict[str, Any]) -> Path:
    """Write ``model`` (``save_pretrained``) and the training ``state`` into ``directory``, atomically."""
    directory = Path(directory)
    staging = directory.with_name(f".{directory.name}.tmp")
    retired = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging)
        atomic_write(staging / STATE_NAME, lambda path: torch.save(state, path))
        if directory.exists():
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(directory, retired)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(retired, ignore_errors=True)
    return directory


def find_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The complete checkpoint at ``directory``, or the previous one if a crash hit between the two renames."""
    directory = Path(directory)
    retired = directory.with_name(f".{directory.name}.old")
    if (directory / STATE_NAME).is_file():
        return directory
    if (retired / STATE_NAME).is_file():
        return retired
    return None


def load_state(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The training state of a checkpoint folder, read with ``weights_only=True``."""
    return torch.load(Path(directory) / STATE_NAME, map_location=map_location, weights_only=True)


def load_weights(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Load ``model.safetensors`` of a checkpoint folder into ``model`` (on its device)."""
    from safetensors.torch import load_file

    from hopformer.models.transformer import WEIGHTS_NAME

    device = next(model.parameters()).device
    model.load_state_dict(load_file(str(Path(directory) / WEIGHTS_NAME), device=str(device)))
