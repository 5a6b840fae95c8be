"""The ``hopformer`` command as a package: every verb a module of ``hopformer.cli``, imported only when it runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hopformer.cli import VERBS, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_is_a_module_of_the_cli_package_with_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: hopformer {verb}" in capsys.readouterr().out
    assert f"hopformer.cli.{verb}" in sys.modules


def test_help_imports_only_what_it_shows_and_every_entry_point_runs():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def imported_by(argv: list[str]) -> str:
        code = (
            f"import sys\nfrom hopformer.cli import main\ntry: main({argv!r})\nexcept SystemExit: pass\n"
            "print(sorted(m for m in sys.modules if m.startswith(('torch', 'hopformer.cli.'))))"
        )
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        return run.stdout.strip().splitlines()[-1]

    assert imported_by(["--help"]) == "[]"  # no verb module and no torch: `hopformer --help` stays fast
    assert imported_by(["train", "--help"]) == "['hopformer.cli.train']"
    for module in ("hopformer", "hopformer.cli"):
        result = subprocess.run([sys.executable, "-m", module, "--help"], env=env, capture_output=True, text=True)
        assert result.returncode == 0 and all(verb in result.stdout for verb in VERBS), module
