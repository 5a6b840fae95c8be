"""``hopformer data``: the listops sub-command end to end, argument errors, the pathfinder hook."""

from __future__ import annotations

import sys

import pytest

from hopformer.cli import main
from hopformer.data.listops import evaluate_listops, generate_listops, load_listops_tsv, write_listops_tsv

SMALL = ["--min-length", "10", "--max-length", "100"]


def test_listops_writes_the_three_splits(tmp_path, capsys):
    out = tmp_path / "listops-1000"
    argv = ["data", "listops", "--out", str(out), "--train", "20", "--val", "5", "--test", "5", "--seed", "1"]
    assert main([*argv, *SMALL, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    sources = []
    for split, count in (("train", 20), ("val", 5), ("test", 5)):
        path = out / f"basic_{split}.tsv"
        assert str(path) in printed
        lines = path.read_text().splitlines()
        assert lines[0] == "Source\tTarget"
        assert len(lines) == 1 + count
        for line in lines[1:]:
            source, target = line.split("\t")
            assert evaluate_listops(source) == int(target)
            sources.append(source)
        assert len(load_listops_tsv(path)) == count
    # One unique set, split in order.
    expected = generate_listops(30, seed=1, min_length=10, max_length=100, progress=False)
    assert sources == [source for source, _ in expected]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--train", "-1"], "argument --train"),
        (["--val", "two"], "argument --val"),
        (["--min-length", "100", "--max-length", "100"], "argument --max-length"),
        (["--max-args", "1"], "argument --max-args"),
        (["--workers", "0"], "argument --workers"),
        (["--max-depth", "2"], "max_depth=2"),  # no such tree can be 500 long
    ],
)
def test_listops_bad_arguments(tmp_path, capsys, extra, message):
    argv = ["data", "listops", "--out", str(tmp_path / "out"), "--train", "3", "--val", "1", "--test", "1"]
    try:
        status = main([*argv, *extra, "--no-progress"])
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    assert status == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_help_lists_both_tasks(capsys):
    with pytest.raises(SystemExit):
        main(["data", "--help"])
    text = capsys.readouterr().out
    assert "listops" in text and "pathfinder" in text


def test_pathfinder_missing_module_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "hopformer.data.pathfinder", None)  # import now fails for that module
    assert main(["data", "pathfinder", "--out", "somewhere", "--n", "3"]) == 2
    assert "hopformer.data.pathfinder" in capsys.readouterr().err


def test_pathfinder_is_configured_by_its_module(monkeypatch, capsys):
    import types

    fake = types.ModuleType("hopformer.data.pathfinder")
    calls = []
    fake.add_arguments = lambda parser: parser.add_argument("--n", type=int, required=True)
    fake.run_from_args = lambda args: calls.append(args.n) or 0
    monkeypatch.setitem(sys.modules, "hopformer.data.pathfinder", fake)
    assert main(["data", "pathfinder", "--n", "7"]) == 0
    assert calls == [7]


def test_listops_baseline_prints_each_split(tmp_path, capsys):
    rows = generate_listops(120, seed=5, workers=1, progress=False, min_length=10, max_length=100)
    folder = tmp_path / "listops-1000"
    folder.mkdir()
    for split, part in (("train", rows[:80]), ("val", rows[80:100]), ("test", rows[100:])):
        write_listops_tsv(folder / f"basic_{split}.tsv", part)
    assert main(["data", "listops-baseline", str(tmp_path)]) == 0  # finds the listops-1000/ subfolder
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["split", "examples", "root", "operator", "majority", "class"]
    assert [line.split()[:2] for line in lines[1:]] == [["train", "80"], ["val", "20"], ["test", "20"]]
    for line in lines[1:]:
        root, majority = (float(cell.rstrip("%")) for cell in line.split()[2:])
        assert 0 <= root <= 100 and 0 < majority <= 100


def test_listops_baseline_missing_files(tmp_path, capsys):
    assert main(["data", "listops-baseline", str(tmp_path)]) == 2
    assert "basic_train.tsv" in capsys.readouterr().err
