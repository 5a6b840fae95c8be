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
    header = next(line for line in printed.splitlines() if line.startswith("| ") and "pattern" in line)
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    assert columns == [
        "pattern",
        "L",
        "block",
        "density",
        "keys/query",
        "degree min/mean/max (block)",
        "diameter (block)",
        "gap A",
        "gap K=5",
        "gap PPR",
        "NIP (block)",
        "seconds",
    ]
    assert printed.count("| hypercube |") == 2
    hypercube_512 = next(line for line in printed.splitlines() if "| hypercube |" in line and "| 512 |" in line)
    assert "5 / 5.0 / 5" in hypercube_512  # Q_5 over 32 blocks: every block has 5 neighbours
    names = {path.name for path in out.iterdir()}
    pictures = {f"pattern_{p}_L{L}.png" for p in ("hypercube", "local", "full") for L in (256, 512)}
    assert names == {"spectra.png", "scaling.png", "graph_comparison.png", "measures.json"} | pictures
    for name in names - {"measures.json"}:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
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


def test_grid2d_options(capsys):
    """An image 16 pixels wide (not square) with 5 x 5 neighbourhoods: diameter ceil(15 / 2) = 8 hops."""
    code = main(["graph", "grid2d", "bigbird", "--seq-len", "192", "--side", "16", "--radius", "2"])
    captured = capsys.readouterr()
    assert code == 0
    rows = [[cell.strip() for cell in line.split("|")] for line in captured.out.splitlines() if "|" in line]
    grid = next(row for row in rows if row[1] == "grid2d")
    assert grid[7] == "8"  # the diameter column
    assert "bigbird takes no --side, --radius" in captured.err


def test_disconnected_and_isolated_graphs_are_reported_not_raised(tmp_path, capsys):
    """local with a 1-block window: at token level the blocks are separate cliques (disconnected:
    diameter inf, NIP 0); at block level every block is isolated (NIP undefined, not a crash)."""
    out = tmp_path / "figures"
    args = ["graph", "local", "--seq-len", "128", "--block-size", "16", "--window", "1", "--out", str(out)]
    assert main(args + ["--level", "token"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("|   local"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[5:] == ["15 / 15.0 / 15", "inf", "0.0000", "0.0000", "0.0000", "0 (disconnected)", cells[-1]]

    def strict(constant: str) -> None:
        raise AssertionError(f"measures.json is not standard JSON: {constant}")

    measured = json.loads((out / "measures.json").read_text(), parse_constant=strict)[0]
    assert measured["diameter"] == "inf" and measured["nip"] == 0.0 and measured["log10_nip"] == "-inf"
    assert main(args) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("|   local"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[5:7] == ["0 / 0.0 / 0", "inf"] and cells[10] == "undefined (isolated node)"
    measured = json.loads((out / "measures.json").read_text(), parse_constant=strict)[0]
    assert measured["nip"] == "nan" and float(measured["diameter"]) == math.inf


@pytest.mark.parametrize("alpha", ["0", "1.5", "-0.1", "nan"])
def test_bad_alpha_is_a_clear_error(alpha, capsys):
    assert main(["graph", "full", "--seq-len", "128", "--alpha", alpha]) == 2
    assert "alpha must be in (0, 1]" in capsys.readouterr().err


def test_bad_pattern_lists_the_allowed_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["graph", "butterfly", "--seq-len", "256"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    for name in ("full", "local", "longformer", "bigbird", "diffuser", "hypercube"):
        assert name in error


def test_pattern_error_is_reported_not_raised(capsys):
    code = main(["graph", "local", "--seq-len", "64", "--block-size", "64", "--window", "4"])  # windows are odd
    assert code == 2
    assert "window" in capsys.readouterr().err
