"""``hopformer report``: run folders grouped by settings (seeds merged), named by what differs, scored."""

import json
import random
import statistics

import pytest
import yaml

from hopformer.cli import main
from hopformer.train.config import from_dict, save_config
from hopformer.train.report import read_run, seed_mean, summarise


def _run(folder, *, attention, seed, options=None, vals=(), test=None, steps=1000, time_limit=None):
    """A run folder as the trainer leaves it: config.yaml, metrics.jsonl, and results.json once finished."""
    folder.mkdir(parents=True)
    config = from_dict(
        {
            "task": "pathfinder32",
            "model": {"attention": attention, "attention_options": options or {}},
            "train": {"seed": seed, "steps": steps, "run_dir": str(folder), "time_limit_minutes": time_limit},
        }
    )
    save_config(config, folder / "config.yaml")
    records = []
    for i, accuracy in enumerate(vals, start=1):
        step = i * 100
        records.append(
            {"step": step, "split": "train", "loss": 0.6, "accuracy": accuracy + 0.01, "steps_per_s": 10.0 + i}
        )
        records.append({"step": step, "split": "val", "loss": 0.6, "accuracy": accuracy})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if test is not None:
        (folder / "results.json").write_text(json.dumps({"test_accuracy": test, "step": steps}))
    return folder


def test_runs_differing_only_in_seed_form_one_row(tmp_path):
    rng = random.Random()
    bigbird_tests = [rng.uniform(0.55, 0.7) for _ in range(3)]
    runs = [
        _run(tmp_path / f"bb-{seed}", attention="bigbird", seed=seed, vals=(0.5, 0.6), test=t, time_limit=seed + 1.0)
        for seed, t in enumerate(bigbird_tests)
    ]
    runs.append(_run(tmp_path / "d1-0", attention="diffuser", seed=0, options={"hops": 1}, vals=(0.5, 0.55), test=0.5))
    runs.append(_run(tmp_path / "d1-1", attention="diffuser", seed=1, options={"hops": 1}, vals=(0.52, 0.51, 0.54)))
    runs.append(
        _run(tmp_path / "d-c", attention="diffuser", seed=0, options={"hops": 1, "coefficients": [0, 1]}, vals=(0.5,))
    )
    report = summarise([read_run(folder) for folder in runs])

    labels = [row["label"] for row in report["rows"]]
    assert labels == ["attention=bigbird", "attention=diffuser hops=1", "attention=diffuser coefficients=[0,1] hops=1"]
    bigbird, one_hop, coefficients = report["rows"]
    assert bigbird["seeds"] == [0, 1, 2] and bigbird["finished"] == 3
    assert bigbird["test_mean"] == pytest.approx(100 * statistics.fmean(bigbird_tests))
    assert bigbird["test_std"] == pytest.approx(100 * statistics.stdev(bigbird_tests))
    assert one_hop["finished"] == 1 and one_hop["test_std"] is None and one_hop["test_mean"] == pytest.approx(50.0)
    assert one_hop["best_val_mean"] == pytest.approx((55.0 + 54.0) / 2)  # each seed's best validation
    unfinished = one_hop["runs"][1]
    assert unfinished["step"] == 300 and unfinished["test"] is None and unfinished["steps_per_s"] == pytest.approx(12.0)
    assert coefficients["test_mean"] is None and report["shared"] == {"task": "pathfinder32", "train.steps": 1000}


def test_report_command_prints_and_writes(tmp_path, capsys):
    a = _run(tmp_path / "a", attention="local", seed=0, vals=(0.4, 0.45), test=0.44)
    b = _run(tmp_path / "b", attention="local", seed=1, vals=(0.4,), test=0.46)
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "| all runs | 0, 1 | 45.00 ± 1.41 | 44.00 / 46.00 | 42.50 ± 3.54 | – / – | 2 of 2 |" in printed
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written["rows"][0]["test_mean"] == pytest.approx(45.0)
    assert (tmp_path / "out" / "report.md").read_text() in printed


def test_report_gives_each_row_its_gap_to_the_top_row(tmp_path):
    rng = random.Random()
    scores = {name: [rng.uniform(0.3, 0.4) for _ in range(count)] for name, count in (("local", 3), ("bigbird", 4))}
    scores["local"][0] = 0.7  # so that local is the top row
    runs = [
        _run(tmp_path / f"{name}-{seed}", attention=name, seed=seed, vals=(test - 0.01, test + 0.02), test=test)
        for name, tests in scores.items()
        for seed, test in enumerate(tests)
    ]
    runs.append(_run(tmp_path / "full-0", attention="full", seed=0, vals=(0.2,), test=0.2))
    top, second, single = summarise([read_run(folder) for folder in runs])["rows"]
    labels = [top["label"], second["label"], single["label"]]
    assert labels == ["attention=local", "attention=bigbird", "attention=full"]

    def welch(a, b):  # difference of the means in points, and its standard error
        a, b = [100 * x for x in a], [100 * x for x in b]
        error = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
        return [statistics.fmean(a) - statistics.fmean(b), error]

    assert top["test_gap"] is None and top["best_val_gap"] is None
    assert second["test_gap"] == pytest.approx(welch(scores["bigbird"], scores["local"]))
    best_vals = {name: [t + 0.02 for t in tests] for name, tests in scores.items()}
    assert second["best_val_gap"] == pytest.approx(welch(best_vals["bigbird"], best_vals["local"]))
    assert second["best_val_std"] == pytest.approx(100 * statistics.stdev(best_vals["bigbird"]))
    assert single["test_gap"] is None  # one seed: no spread to compare with


def test_a_run_made_before_a_setting_existed_groups_with_newer_runs(tmp_path):
    old = _run(tmp_path / "old", attention="bigbird", seed=0, vals=(0.5,), test=0.5)
    new = _run(tmp_path / "new", attention="bigbird", seed=1, vals=(0.6,), test=0.6)
    config = yaml.safe_load((old / "config.yaml").read_text())
    del config["model"]["embedding"]  # as written before the setting was added (its default is the old behaviour)
    (old / "config.yaml").write_text(yaml.safe_dump(config))
    (row,) = summarise([read_run(old), read_run(new)])["rows"]
    assert row["seeds"] == [0, 1] and row["test_mean"] == pytest.approx(55.0)


def test_report_draws_validation_curves(tmp_path):
    pytest.importorskip("matplotlib")
    a = _run(tmp_path / "a", attention="bigbird", seed=0, vals=(0.5, 0.6, 0.62), test=0.6)
    b = _run(tmp_path / "b", attention="diffuser", seed=0, vals=(0.5, 0.55))
    with (a / "metrics.jsonl").open("a") as f:  # a second training log in the first evaluation interval
        f.write(json.dumps({"step": 50, "split": "train", "loss": 0.7, "accuracy": 0.3}) + "\n")
    report = summarise([read_run(a), read_run(b)])
    steps, accuracies = zip(*report["rows"][0]["runs"][0]["val_curve"])
    assert steps == (100, 200, 300) and accuracies == pytest.approx((50.0, 60.0, 62.0))
    steps, accuracies = zip(*report["rows"][0]["runs"][0]["train_curve"])  # mean over each interval
    assert steps == (100, 200, 300) and accuracies == pytest.approx(((30.0 + 51.0) / 2, 61.0, 63.0))
    steps, losses = zip(*report["rows"][0]["runs"][0]["train_loss_curve"])
    assert steps == (100, 200, 300) and losses == pytest.approx(((0.7 + 0.6) / 2, 0.6, 0.6))
    assert [s for s, _ in report["rows"][0]["runs"][0]["val_loss_curve"]] == [100, 200, 300]
    # a row of three seeds is drawn as a mean with a band, beside a row of one run
    seeds = [_run(tmp_path / f"c{s}", attention="full", seed=s, vals=(0.4, 0.5 + 0.01 * s)) for s in range(3)]
    assert main(["report", str(a), str(b), *map(str, seeds), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seed_mean_averages_over_the_runs_that_reached_each_step():
    rng = random.Random()
    curves = [[[100 * (i + 1), rng.uniform(0, 100)] for i in range(rng.randint(1, 6))] for _ in range(4)]
    steps, means, stds = seed_mean(curves)
    assert steps == sorted({step for curve in curves for step, _ in curve})
    for step, mean, std in zip(steps, means, stds):
        values = [value for curve in curves for s, value in curve if s == step]
        assert mean == pytest.approx(statistics.fmean(values))
        assert std == (pytest.approx(statistics.stdev(values)) if len(values) > 1 else None)


def test_report_names_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty is not a run folder: config.yaml is missing"):
        read_run(tmp_path / "empty")
    with pytest.raises(ValueError, match="no run folders given"):
        summarise([])
