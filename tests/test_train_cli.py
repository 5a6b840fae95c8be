"""The ``train``, ``eval`` and ``lra`` verbs, run in-process through ``hopformer.cli.main``."""

from __future__ import annotations

import json

import pytest

from hopformer.cli import main

TINY = [
    "--set", "data.generate.train=48", "--set", "data.generate.val=16", "--set", "data.generate.test=16",
    "--set", "data.generate.min_length=3", "--set", "data.generate.max_length=40",
    "--set", "model.dim=16", "--set", "model.mlp_dim=32", "--set", "model.depth=1",
    "--set", "train.threads=1", "--set", "train.log_every=1",
    "--steps", "3", "--batch-size", "8", "--eval-every", "2", "--device", "cpu", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny diffuser run on freshly generated ListOps (its data folder starts empty)."""
    root = tmp_path_factory.mktemp("cli")
    code = main(
        ["train", "--task", "listops", "--attention", "diffuser", "--attention-option", "hops=2",
         "--attention-option", "alpha=0.2", "--data-dir", str(root / "data"), "--run-dir", str(root / "run"),
         "--seed", "1", "--lr", "0.002", *TINY]
    )  # fmt: skip
    assert code == 0
    return root


def test_train_generates_data_trains_and_reports(trained, capsys):
    run = trained / "run"
    for name in ("basic_train.tsv", "basic_val.tsv", "basic_test.tsv"):
        assert (trained / "data" / name).is_file()
    for name in ("config.yaml", "metrics.jsonl", "results.json", "last/model.safetensors", "best/state.pt"):
        assert (run / name).is_file(), name
    model_config = json.loads((run / "best" / "config.json").read_text())
    assert model_config["attention"] == "diffuser"  # the transformers config format: settings flat
    assert model_config["attention_options"] == {"hops": 2, "alpha": 0.2}
    results = json.loads((run / "results.json").read_text())
    assert results["step"] == 3 and 0 <= results["test_accuracy"] <= 1
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 0.002 and saved["train"]["seed"] == 1 and saved["train"]["steps"] == 3


def test_eval_on_a_tsv_matches_the_run(trained, capsys):
    results = json.loads((trained / "run" / "results.json").read_text())
    capsys.readouterr()
    code = main(["eval", "--checkpoint", str(trained / "run"), "--data", str(trained / "data" / "basic_test.tsv"),
                 "--device", "cpu", "--json"])  # fmt: skip
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["count"] == 16
    assert printed["accuracy"] == pytest.approx(results["test_accuracy"])  # best/ on test, as train reported
    code = main(["eval", "--checkpoint", str(trained / "run"), "--split", "val", "--which", "last", "--device", "cpu"])
    assert code == 0
    assert "accuracy" in capsys.readouterr().out


def test_eval_names_a_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="best"):
        main(["eval", "--checkpoint", str(tmp_path), "--data", "x.tsv", "--device", "cpu", "--debug"])


def test_resume_of_a_finished_run_only_reports(trained, capsys):
    code = main(["train", "--resume", str(trained / "run"), "--no-progress"])
    assert code == 0
    assert "test accuracy" in capsys.readouterr().out


def test_lra_collects_runs_into_a_table(trained, tmp_path, capsys):
    runs = tmp_path / "lra"
    (runs / "listops-full-s0").mkdir(parents=True)
    cost = {"steps_per_s": 10.0, "peak_memory_mib": 2048.0}
    (runs / "listops-full-s0" / "results.json").write_text(json.dumps({"test_accuracy": 0.3, "extra": cost}))
    (runs / "listops-full-s1").mkdir(parents=True)
    cost = {"steps_per_s": 12.0, "peak_memory_mib": 1024.0}
    (runs / "listops-full-s1" / "results.json").write_text(json.dumps({"test_accuracy": 0.4, "extra": cost}))
    code = main(["lra", "--tasks", "listops", "--attentions", "full,diffuser", "--seeds", "0,1",
                 "--runs-dir", str(runs), "--collect-only"])  # fmt: skip
    assert code == 0
    table = json.loads((runs / "results.json").read_text())
    full, diffuser = table["rows"]
    assert full["tasks"]["listops"]["mean"] == pytest.approx(35.0) and full["avg"] == pytest.approx(35.0)
    assert full["tasks"]["listops"]["std"] == pytest.approx(50**0.5)  # sample std of 30 and 40 (n - 1)
    assert diffuser["tasks"] == {} and diffuser["avg"] is None
    markdown = (runs / "results.md").read_text()
    assert "35.00 ± 7.07" in markdown and "Transformer (published)" in markdown and "36.37" in markdown
    assert full["tasks"]["listops"]["steps_per_s"] == pytest.approx(11.0)  # median over seeds
    assert "| hopformer full | 11.00 | 1.5 |" in markdown  # steps/s, peak GiB
    assert "†" not in markdown

    # a run whose best/ went missing tested its final weights: the cell and the note say so
    saved = {"test_accuracy": 0.3, "extra": {"test_checkpoint": "final"}}
    (runs / "listops-full-s0" / "results.json").write_text(json.dumps(saved))
    assert main(["lra", "--tasks", "listops", "--attentions", "full", "--seeds", "0,1",
                 "--runs-dir", str(runs), "--collect-only"]) == 0  # fmt: skip
    table = json.loads((runs / "results.json").read_text())
    assert table["rows"][0]["tasks"]["listops"]["final_weights"] == 1
    markdown = (runs / "results.md").read_text()
    assert "| **hopformer full** | 35.00 ± 7.07 † |" in markdown and "test scored the final weights" in markdown


def test_lra_trains_a_missing_cell(trained, tmp_path, capsys):
    runs = tmp_path / "lra"
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    (config_dir / "listops_pytorch.yaml").write_text(f"data: {{data_dir: {trained / 'data'}}}\n")
    code = main(["lra", "--tasks", "listops", "--attentions", "local", "--scale", "pytorch",
                 "--config-dir", str(config_dir), "--runs-dir", str(runs), "--no-progress",
                 "--set", "train.steps=2", "--set", "train.batch_size=8", "--set", "model.dim=16",
                 "--set", "model.depth=1", "--set", "train.threads=1", "--device", "cpu"])  # fmt: skip
    assert code == 0
    assert (runs / "listops-local-s0" / "results.json").is_file()
    assert "Standard (Nyströmformer paper)" in (runs / "results.md").read_text()


def test_every_verb_has_help(capsys):
    for verb in ("train", "eval", "lra"):
        with pytest.raises(SystemExit) as exit_info:
            main([verb, "--help"])
        assert exit_info.value.code == 0
        assert "usage: hopformer" in capsys.readouterr().out


def test_bad_option_values_are_named(tmp_path):
    with pytest.raises(ValueError, match="attention"):
        main(["train", "--attention", "nope", "--run-dir", str(tmp_path / "r"), "--no-progress", "--debug"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        main(["train", "--attention-option", "hops", "--run-dir", str(tmp_path / "r"), "--no-progress", "--debug"])


class FakeClock:
    """``control.clock``: every reading advances the time by one second."""

    def __init__(self) -> None:
        self.time = 0.0

    def __call__(self) -> float:
        self.time += 1.0
        return self.time


def test_time_limit_exits_cleanly_and_resume_finishes(trained, tmp_path, capsys, monkeypatch):
    from hopformer.train import control

    monkeypatch.setattr(control, "clock", FakeClock())
    run = tmp_path / "run"
    argv = ["train", "--data-dir", str(trained / "data"), "--run-dir", str(run), *TINY]
    argv[argv.index("--steps") + 1] = "30"
    assert main([*argv, "--time-limit", "0.4"]) == 0  # a clean stop is a success
    out = capsys.readouterr().out
    assert f"stopped at time limit, resume with --resume {run}" in out
    assert not (run / "results.json").exists()

    monkeypatch.setattr(control, "clock", FakeClock())
    assert main(["train", "--resume", str(run), "--time-limit", "60", "--no-progress"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert json.loads((run / "results.json").read_text())["step"] == 30


def _timed_grid(trained, tmp_path, attentions: str, steps: int, eval_every: int) -> list[str]:
    """``hopformer lra`` arguments of a tiny ListOps grid under a 3-minute deadline (runs in tmp_path/lra)."""
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    (config_dir / "listops.yaml").write_text(f"data: {{data_dir: {trained / 'data'}}}\n")
    return ["lra", "--tasks", "listops", "--attentions", attentions, "--config-dir", str(config_dir),
            "--runs-dir", str(tmp_path / "lra"), "--no-progress", "--device", "cpu", "--set", f"train.steps={steps}",
            "--set", "train.batch_size=8", "--set", "model.dim=16", "--set", "model.depth=1",
            "--set", "train.threads=1", "--set", f"train.eval_every={eval_every}", "--time-limit", "3"]  # fmt: skip


def test_lra_time_limit_leaves_cells_for_the_next_call(trained, tmp_path, capsys, monkeypatch):
    from hopformer.train import control

    runs = tmp_path / "lra"
    argv = _timed_grid(trained, tmp_path, "full,local", steps=100, eval_every=20)
    monkeypatch.setattr(control, "clock", FakeClock())
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "stopped at time limit" in out and "not finished: listops-full-s0, listops-local-s0" in out
    assert (runs / "listops-full-s0" / "last").is_dir() and not (runs / "listops-local-s0").exists()
    calls = 0
    while not (runs / "listops-local-s0" / "results.json").is_file():  # each call continues the grid
        calls += 1
        assert calls < 10
        monkeypatch.setattr(control, "clock", FakeClock())
        assert main(argv) == 0
    table = json.loads((runs / "results.json").read_text())
    assert all("listops" in row["tasks"] for row in table["rows"])
    assert "not finished" not in capsys.readouterr().out.splitlines()[-1]


def test_lra_pretrains_each_cell_before_its_classifier(trained, tmp_path, capsys, monkeypatch):
    import yaml

    from hopformer.train import control

    runs = tmp_path / "lra"
    argv = _timed_grid(trained, tmp_path, "local", steps=30, eval_every=10)
    argv += ["--pretrain-steps", "60", "--pretrain-set", "optim.lr=0.003"]
    calls = 0
    while not (runs / "listops-local-s0" / "results.json").is_file():  # each call goes on where the last stopped
        calls += 1
        assert calls < 12
        monkeypatch.setattr(control, "clock", FakeClock())
        assert main(argv) == 0
    assert calls > 1  # the deadline cut the stages, so resuming across them was exercised
    pretrain, cell = runs / "listops-local-s0-pretrain", runs / "listops-local-s0"
    pre_config = yaml.safe_load((pretrain / "config.yaml").read_text())
    assert pre_config["train"]["objective"] == "masked" and pre_config["train"]["steps"] == 60
    assert pre_config["optim"]["lr"] == 0.003  # --pretrain-set reaches the pretraining only
    cell_config = yaml.safe_load((cell / "config.yaml").read_text())
    assert cell_config["train"]["objective"] == "classify" and cell_config["train"]["steps"] == 30
    assert cell_config["train"]["init_from"] == str(pretrain) and cell_config["optim"]["lr"] != 0.003
    assert json.loads((pretrain / "results.json").read_text())["step"] == 60
    table = json.loads((runs / "results.json").read_text())
    assert table["pretrain_steps"] == 60 and [row["model"] for row in table["rows"]] == ["hopformer local"]
    assert "self-pretrained 60 steps" in (runs / "results.md").read_text()


def test_lra_pretraining_options_are_checked(tmp_path):
    base = ["lra", "--tasks", "listops", "--runs-dir", str(tmp_path)]
    with pytest.raises(ValueError, match="--pretrain-steps must be a positive step count, got 0"):
        main([*base, "--pretrain-steps", "0", "--debug"])
    with pytest.raises(ValueError, match="--pretrain-set needs --pretrain-steps"):
        main([*base, "--pretrain-set", "optim.lr=0.001", "--debug"])


def test_lra_reports_a_failing_cell_and_goes_on(tmp_path, capsys):
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    (config_dir / "image.yaml").write_text(f"data: {{data_dir: {tmp_path / 'missing'}}}\n")
    code = main(["lra", "--tasks", "image", "--attentions", "full,local", "--config-dir", str(config_dir),
                 "--runs-dir", str(tmp_path / "lra"), "--no-progress", "--device", "cpu"])  # fmt: skip
    assert code == 0  # the grid goes on past a failing cell and still writes its table
    for cell in ("image-full-s0", "image-local-s0"):
        assert "missing" in (tmp_path / "lra" / cell / "error.txt").read_text()
    assert "failed: see" in capsys.readouterr().out and (tmp_path / "lra" / "results.md").is_file()


def test_the_published_rows_are_package_data_with_their_sources():
    from hopformer.train.grid import COLUMNS, published_lra

    official, pytorch = published_lra("official"), published_lra("pytorch")
    assert "LRA README" in official["source"] and "Nyströmformer" in pytorch["source"]
    assert list(official["rows"])[-2:] == ["Transformer", "BigBird"] and official["rows"]["Transformer"]["avg"] == 54.39
    for board in (official, pytorch):
        for name, row in board["rows"].items():
            assert set(row) == {*COLUMNS, "avg"}, name
            mean = sum(row[task] for task in COLUMNS) / len(COLUMNS)
            assert abs(mean - row["avg"]) < 0.011 or name == "Sinkhorn Transformer", name  # its published avg: 51.29
    with pytest.raises(ValueError, match="scale='jax' is not known"):
        published_lra("jax")
