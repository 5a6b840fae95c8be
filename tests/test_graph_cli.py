"""The ``hopformer graph`` verb: table, figures, pattern options, errors."""

from __future__ import annotations

import json
import math

import pytest

from hopformer.analysis import closed_form_nip
from hopformer.cli import main


def test_table_and_figures(tmp_path, capsys):
    out = tmp_path / "figures"
    code = main(
        [
            "graph",
            "hypercube",
            "local",
            "full",
            "--seq-len",
            "256",
            "512",
            "--block-size",
            "16",
            "--alpha",
            "0.1",
            "--hops",
            "5",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    for column in ("pattern", "density", "keys/query", "diameter (block)", "gap A", "gap K=5", "gap PPR", "NIP"):
        assert column in printed
    assert printed.count("| hypercube |") == 2
    names = {path.name for path in out.iterdir()}
    assert {"spectra.png", "scaling.png", "graph_comparison.png", "measures.json"} <= names
    assert {f"pattern_{p}_L{L}.png" for p in ("hypercube", "local", "full") for L in (256, 512)} <= names
    rows = json.loads((out / "measures.json").read_text())
    by_key = {(row["pattern"], row["seq_len"]): row for row in rows}
    # hypercube at 512 tokens, block 16: Q_5 over 32 blocks
    assert by_key["hypercube", 512]["nip"] == pytest.approx(closed_form_nip("hypercube", 32), rel=1e-12)
    assert by_key["full", 256]["gap"] == pytest.approx(1.0)
    assert by_key["full", 256]["gap_exact"] == pytest.approx(0.9)
    assert by_key["local", 512]["diameter"] == 31
    assert math.isclose(by_key["hypercube", 256]["density"], 0.3125)


def test_level_and_pattern_options(tmp_path, capsys):
    code = main(
        [
            "graph",
            "bigbird",
            "hypercube",
            "--seq-len",
            "192",
            "--block-size",
            "8",
            "--level",
            "token",
            "--window",
            "5",
            "--num-random",
            "1",
            "--seed",
            "3",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0
    assert "diameter (token)" in captured.out
    assert "hypercube takes no --window, --num-random, --seed" in captured.err


def test_bad_pattern_lists_the_allowed_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["graph", "butterfly", "--seq-len", "256"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    for name in ("full", "local", "longformer", "bigbird", "diffuser", "hypercube"):
        assert name in error


def test_pattern_error_is_reported_not_raised(capsys):
    code = main(["graph", "local", "--seq-len", "64", "--block-size", "64", "--window", "5"])
    assert code == 2
    assert "window" in capsys.readouterr().err
