"""``experiments/lra_h200.sh`` end to end on CPU, tiny model: several seeds side by side, the table, the copies."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "lra_h200.sh"  # experiments/lra_h200.sh

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run_script(phase: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    settings = {
        "PYTHON": sys.executable,
        "DEVICE": "cpu",
        "CONFIG_SUFFIX": "_pytorch",
        "ATTENTIONS": "diffuser",
        "PF_BG_WORKERS": "0",
        "BUDGET_MIN": "5",
        "RUNS_DIR": str(tmp_path / "runs"),
        "DATA_DIR": str(tmp_path / "data"),
        "LISTOPS_ARGS": "--train 48 --val 16 --test 16 --min-length 10 --max-length 60",
        "EXTRA_SET": "train.steps=3 train.batch_size=8 train.eval_every=2 model.dim=16 model.mlp_dim=32 "
        "model.depth=1 train.threads=1",
        "OUT": "",  # not the caller's: where the script copies results is each test's own choice
        **env,
    }
    return subprocess.run(
        ["bash", str(SCRIPT), phase], env={**os.environ, **settings}, capture_output=True, text=True, timeout=300
    )


def test_listops_phase_runs_every_seed_and_tabulates_them(tmp_path):
    out = tmp_path / "out"
    done = run_script("listops", tmp_path, SEEDS="0 1", OUT=str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    for seed in (0, 1):
        result = json.loads((tmp_path / "runs" / f"listops-diffuser-s{seed}" / "results.json").read_text())
        assert result["step"] == 3
        assert (out / "lra" / f"listops-diffuser-s{seed}" / "metrics.jsonl").is_file()
    table = json.loads((tmp_path / "runs" / "results.json").read_text())
    (row,) = table["rows"]
    assert row["tasks"]["listops"]["seeds"] == 2
    assert "±" in (out / "lra" / "results.md").read_text()

    again = run_script("listops", tmp_path, SEED="1")  # one seed, the old spelling: nothing left to train
    assert again.returncode == 0, again.stdout + again.stderr
    assert "listops-diffuser-s1: finished earlier" in again.stdout
    assert "listops-diffuser-s0" not in again.stdout
