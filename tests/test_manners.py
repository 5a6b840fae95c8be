"""First run and bad input: one-line CLI errors, no silent failures, no run folder for a run that cannot start,
fast help with text for every flag, plots that degrade, seeds counted as seeds, short inputs with the defaults."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hopformer.cli import VERBS, main
from hopformer.train import train
from hopformer.train.config import from_dict, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]
OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")


def _listops(folder: Path, sizes=(64, 16, 16)) -> Path:
    """A trivial ListOps task in the released TSV format (the label is the root's first argument)."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in zip(("train", "val", "test"), sizes):
        lines = ["Source\tTarget"]
        for _ in range(count):
            args = [rng.randrange(10) for _ in range(rng.randrange(2, 12))]
            lines.append(f"( {rng.choice(OPERATORS)} {' '.join(map(str, args))} ] )\t{args[0]}")
        (folder / f"basic_{split}.tsv").write_text("\n".join(lines) + "\n")
    return folder


def _train_argv(tmp_path: Path, *extra: str) -> list[str]:
    settings = ["model.dim=16", "model.depth=1", "model.heads=2", "model.mlp_dim=32", "train.log_every=1"]
    sets = [item for setting in settings for item in ("--set", setting)]
    return ["train", "--data-dir", str(tmp_path / "data"), "--run-dir", str(tmp_path / "run"), "--steps", "4",
            "--eval-every", "2", "--batch-size", "8", "--device", "cpu", "--no-progress", *sets, *extra]  # fmt: skip


# ------------------------------------------------------------------------------------------------ errors
def test_a_user_error_is_one_line_with_status_2_and_debug_shows_the_traceback(tmp_path, capsys):
    _listops(tmp_path / "data")
    argv = _train_argv(tmp_path, "--set", "model.dimm=3")
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hopformer: error: --set model.dimm=3: model has no setting 'dimm'")
    assert "Traceback" not in captured.err and not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="--set model.dimm=3"):
        main([*argv, "--debug"])


def test_set_errors_name_set_and_file_errors_name_the_file(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: {dim: 32}\n")
    with pytest.raises(ValueError, match=r"^--set model\.dim must be an integer, got 'wide'"):
        load_config(config, {"model.dim": "wide"})
    with pytest.raises(ValueError, match=r"^--set train=3: train is a section"):
        load_config(config, {"train": 3})
    with pytest.raises(ValueError, match=r"^--set model\.dim\.x=1: model\.dim is a setting, not a section"):
        load_config(config, {"model.dim.x": 1})
    assert load_config(config, {"model.attention_options.hops": 3}).model.attention_options == {"hops": 3}
    config.write_text("model: {dim: 32\n")
    with pytest.raises(ValueError, match=rf"^{config}: not valid YAML"):
        load_config(config)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: (data / "basic_val.tsv").write_text("Source\tTarget\n"), r"basic_val\.tsv: holds no examples"),
        (lambda data: (data / "basic_test.tsv").write_bytes(b"\xff\xfe\x00"), r"basic_test\.tsv: not a ListOps TSV"),
        (lambda data: None, r"--set model\.attention_options\.hops=-1|hops must be"),
    ],
)
def test_a_run_that_cannot_start_leaves_no_folder(tmp_path, capsys, damage, message):
    damage(_listops(tmp_path / "data"))
    extra = ("--attention", "diffuser", "--attention-option", "hops=-1") if "hops" in message else ()
    assert main(_train_argv(tmp_path, *extra)) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=message):
        main([*_train_argv(tmp_path, *extra), "--debug"])


def test_the_final_line_states_the_result_beside_every_trivial_baseline(tmp_path, capsys):
    _listops(tmp_path / "data")
    assert main(_train_argv(tmp_path)) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("test accuracy ") and "(trivial baselines on test: majority class 0." in out[-1]
    assert "root-operator rule 0." in out[-1] and out[-2].endswith(f"; run folder {tmp_path / 'run'}")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0 <= results["extra"]["root_operator_rate"] <= 1 and results["majority_rate"] > 0
    # a file of longer trees than the model takes: evaluated, and the cut said in one warning line
    long = tmp_path / "long.tsv"
    long.write_text("Source\tTarget\n" + "( [MAX " + "1 " * 300 + "] )\t1\n" + "( [MIN 3 4 ] )\t3\n")
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(long), "--device", "cpu"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"hopformer: warning: the model's max_len=128 cuts inputs longer than 128 tokens (the longest has "
                   f"302): {long} 1 of 2 examples"]  # fmt: skip


def _tiny(tmp_path: Path, **train_settings):
    values = {
        "task": "listops",
        "data": {"data_dir": str(_listops(tmp_path / "data"))},
        "model": {"dim": 16, "depth": 1, "heads": 2, "mlp_dim": 32},
        "optim": {"schedule": "constant", "warmup_steps": 0},
        "train": {"steps": 4, "batch_size": 8, "eval_every": 2, "log_every": 1, "progress": False, "device": "cpu",
                  "run_dir": str(tmp_path / "run"), **train_settings},
    }  # fmt: skip
    return from_dict(values)


def test_resume_checks_the_state_and_survives_a_damaged_last_metrics_line(tmp_path):
    train(_tiny(tmp_path), log=lambda *_: None)
    run = tmp_path / "run"
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 5, "split": "tr')  # a kill in the middle of a write
    with pytest.warns(UserWarning, match=r"metrics\.jsonl, line \d+: dropped a damaged last record"):
        result = train(resume=run, resume_overrides={"train.steps": 6}, log=lambda *_: None)
    assert result.step == 6 and result.test_accuracy is not None
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "val"] == [2, 4, 6]

    state_path = run / "last" / "state.pt"
    state = torch.load(state_path, weights_only=True)
    torch.save({**state, "step": -5}, state_path)
    with pytest.raises(ValueError, match=rf"{state_path}: step must be a non-negative integer, got -5"):
        train(resume=run, resume_overrides={"train.steps": 8}, log=lambda *_: None)
    state_path.write_bytes(state_path.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"{state_path}: not a readable training state"):
        train(resume=run, resume_overrides={"train.steps": 8}, log=lambda *_: None)
    weights = run / "last" / "model.safetensors"
    torch.save({**state, "step": 6}, state_path)
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(ValueError, match=rf"{weights}: not a readable safetensors file"):
        train(resume=run, resume_overrides={"train.steps": 8}, log=lambda *_: None)


def test_inputs_cut_by_model_max_len_are_counted_in_a_warning(tmp_path):
    config = _tiny(tmp_path)
    config.model.max_len = 6
    with pytest.warns(UserWarning, match=r"model\.max_len=6 cuts inputs longer than 6 tokens .*: train \d+ of 64"):
        train(config, log=lambda *_: None)


# ------------------------------------------------------------------------------------------------ help
def test_help_imports_no_torch_for_any_verb():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = (
        "import sys\nfrom hopformer.cli import main\n"
        f"for verb in {sorted(VERBS)!r}:\n"
        "    try: main([verb, '--help'])\n    except SystemExit: pass\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert run.stdout.strip().splitlines()[-1] == "[]"


def _actions(parser: argparse.ArgumentParser, prefix: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{prefix} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield prefix, action


def test_every_flag_has_help_text():
    from hopformer.cli import _add_debug

    missing = []
    for verb in VERBS:
        parser = argparse.ArgumentParser()
        importlib.import_module(f"hopformer.cli.{verb}").configure(parser)
        _add_debug(parser)
        missing += [f"{where} {action.option_strings or action.dest}" for where, action in _actions(parser, verb)
                    if not action.help]  # fmt: skip
    assert missing == []


def test_graph_pattern_names_match_the_library():
    from hopformer.cli.graph import PATTERN_NAMES
    from hopformer.graphs import PATTERNS

    assert PATTERN_NAMES == tuple(sorted(PATTERNS))


# ------------------------------------------------------------------------------------------------ plots
def test_graph_out_without_matplotlib_writes_its_json_and_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # importing it now fails
    assert main(["graph", "local", "--seq-len", "128", "--block-size", "16", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "measures.json").read_text())[0]["pattern"] == "local"
    assert "pictures not drawn: matplotlib is missing" in capsys.readouterr().out


def test_bench_plot_title_is_words():
    from hopformer.bench.harness import plot_title

    options = {"block_size": 64, "window": 3, "num_global": 2, "num_random": 3, "seed": 0}
    title = plot_title("bigbird", options)
    assert title == "bigbird graph: 64-token blocks, window 3 blocks, 2 global blocks, 3 random blocks, seed 0"


# ------------------------------------------------------------------------------------------------ report
def _finished_run(folder: Path, seed: int, test: float) -> Path:
    folder.mkdir(parents=True)
    save_config(from_dict({"train": {"seed": seed, "run_dir": str(folder)}}), folder / "config.yaml")
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 100, "split": "val", "loss": 1.0, "accuracy": test}))
    (folder / "results.json").write_text(json.dumps({"test_accuracy": test, "step": 100}))
    return folder


def test_report_counts_two_runs_of_one_seed_as_one_seed(tmp_path, capsys):
    runs = [_finished_run(tmp_path / name, seed, test) for name, seed, test in (("a", 0, 0.4), ("b", 0, 0.5))]
    assert main(["report", *map(str, runs)]) == 0
    out = capsys.readouterr().out
    assert "| all runs | 0 (2 runs) | 45.00 |" in out  # one seed: its runs' mean, no std over "seeds"
    runs.append(_finished_run(tmp_path / "c", 1, 0.7))
    from hopformer.train.report import read_run, summarise

    row = summarise([read_run(run) for run in runs])["rows"][0]
    assert row["seeds"] == [0, 1] and row["repeated_seeds"] == {"0": 2} and row["tests"] == [45.0, 70.0]
    assert row["finished"] == 3


# ------------------------------------------------------------------------------------------------ short inputs
@pytest.mark.parametrize("name", ["local", "longformer", "bigbird", "diffuser"])
def test_default_windows_run_on_short_inputs(name):
    from hopformer.attention import build
    from hopformer.graphs import build_graph

    layer = build(name, 16, 2)
    for length in (1, 10, 64, 65):
        assert layer(torch.randn(1, length, 16)).shape == (1, length, 16)
    wide, exact = build_graph(name, 100, 64, window=5), build_graph(name, 100, 64, window=3)
    assert torch.equal(wide.to_dense(), exact.to_dense())  # a window wider than the sequence covers all of it
    with pytest.raises(ValueError, match="window must be a positive odd number"):
        build_graph(name, 100, 64, window=4)
