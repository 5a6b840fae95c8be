"""A run folder written by hopformer 0.1 (``tests/fixtures/run_v0_1``) resumes to the numbers the 0.1 code gave."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from hopformer.cli import main
from hopformer.models import SequenceClassifier, from_pretrained

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "run_v0_1"

# Resuming the fixture with the 0.1 code (see its README): metrics.jsonl without the timing fields, ...
EXPECTED_METRICS = [
    {"step": 4, "split": "train", "loss": 2.305412530899048, "accuracy": 0.0625, "lr": 0.009000000000000001},
    {"step": 4, "split": "val", "loss": 2.300403594970703, "accuracy": 0.1875},
    {"step": 8, "split": "train", "loss": 2.2829208374023438, "accuracy": 0.125, "lr": 0.005},
    {"step": 8, "split": "val", "loss": 2.2872754335403442, "accuracy": 0.1875},
    {"step": 12, "split": "train", "loss": 2.3063156604766846, "accuracy": 0.15625, "lr": 0.0009999999999999998},
    {"step": 12, "split": "val", "loss": 2.2857954502105713, "accuracy": 0.1875},
    {"step": 12, "split": "test", "loss": 2.297595262527466, "accuracy": 0.125},
]
# ... the digest of the final weights (sha256 over the tensors' names and bytes, by name) ...
EXPECTED_LAST_SHA256 = "eb927e32398c0fe6c8af34998919154f0f05ef86290920f767232158c104524c"
# ... and ``hopformer eval --checkpoint RUN --split test --which last``.
EXPECTED_LAST_TEST = {"loss": 2.3054494857788086, "accuracy": 0.125, "count": 16}


def copy_fixture(tmp_path: Path) -> Path:
    """The fixture copied into ``tmp_path``, its config pointing at the copy's data and run folders."""
    root = tmp_path / "run_v0_1"
    shutil.copytree(FIXTURE, root)
    path = root / "run" / "config.yaml"
    values = yaml.safe_load(path.read_text())
    values["data"]["data_dir"] = str(root / "data")
    values["train"]["run_dir"] = str(root / "run")
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return root / "run"


def weights_digest(path: Path) -> str:
    weights = load_file(str(path))
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].numpy().tobytes())
    return digest.hexdigest()


def test_a_v0_1_run_folder_resumes_to_the_numbers_v0_1_gave(tmp_path, capsys, caplog):
    run = copy_fixture(tmp_path)
    with caplog.at_level(logging.WARNING, logger="hopformer.train.config"):
        assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    # its model.pooling and model.head_dim were read at their new place, with one warning line
    warnings = [record.getMessage() for record in caplog.records]
    assert (
        len(warnings) == 1 and "model.pooling is now head.pooling, model.head_dim is now head.head_dim" in warnings[0]
    )
    saved = yaml.safe_load((run / "config.yaml").read_text())  # written back in the new form
    assert saved["head"] == {"pooling": "cls", "head_dim": 24, "tie_embeddings": True}
    assert "pooling" not in saved["model"]
    results = json.loads((run / "results.json").read_text())
    assert (results["step"], results["best_val_accuracy"]) == (12, 0.1875)
    assert (results["test_accuracy"], results["test_loss"]) == (0.125, 2.297595262527466)
    assert results["extra"]["test_checkpoint"] == "best"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    timing = ("tokens_per_s", "steps_per_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in records] == EXPECTED_METRICS
    assert weights_digest(run / "last" / "model.safetensors") == EXPECTED_LAST_SHA256

    capsys.readouterr()
    command = ["eval", "--checkpoint", str(run), "--split", "test", "--which", "last", "--device", "cpu", "--json"]
    assert main(command) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k: scored[k] for k in EXPECTED_LAST_TEST} == EXPECTED_LAST_TEST


@pytest.mark.parametrize("which", ["last", "best"])
def test_from_pretrained_loads_a_v0_1_checkpoint(which):
    model = from_pretrained(FIXTURE / "run" / which)
    assert isinstance(model, SequenceClassifier)
    assert (model.config.pooling, model.config.head_dim, model.config.num_classes) == ("cls", 24, 10)
    encoder = model.config.encoder
    assert (encoder.attention, encoder.attention_options) == ("diffuser", {"hops": 2, "block_size": 16})
    assert (encoder.vocab_size, encoder.max_len, encoder.pad_to_multiple) == (16, 129, 128)
