"""``experiments/pathfinder_cnn.py``, the Pathfinder learnability probe (test moved here from tests/test_bench.py)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import torch


def _experiment_script(name: str):
    """Import ``experiments/<name>.py`` (a script folder, not a package) as a module."""
    path = Path(__file__).resolve().parents[1] / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pathfinder_cnn_probe_trains_and_writes_its_record(tmp_path):
    """experiments/pathfinder_cnn.py on 40 generated images: per-epoch rows, a test accuracy, the command."""
    from hopformer.data.pathfinder import generate_pathfinder

    generate_pathfinder(tmp_path / "data", n=40, workers=1, progress=False)
    module = _experiment_script("pathfinder_cnn")
    out = tmp_path / "cnn.json"
    args = ["--data-dir", str(tmp_path / "data"), "--epochs", "2", "--batch-size", "8", "--channels", "4"]
    assert module.main([*args, "--depth", "3", "--max-dilation", "1", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert [row["epoch"] for row in record["epochs"]] == [1, 2]
    assert record["settings"]["train_images"] == 32 and record["settings"]["parameters"] > 0
    assert 0.0 <= record["test_accuracy"] <= 1.0 and math.isfinite(record["test_loss"])
    assert "--depth 3" in record["command"] and record["settings"]["max_dilation"] == 1
    plain = module.DilatedCNN(4, 3, max_dilation=1)
    assert [layer.dilation for layer in plain.features if isinstance(layer, torch.nn.Conv2d)] == [(1, 1)] * 3
