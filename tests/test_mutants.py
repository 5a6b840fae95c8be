"""The mutation-testing catalogue (``tools/mutants.py``) still applies to the code: every planted bug's text
occurs exactly once where it says, and its tests exist. (``python tools/mutation.py`` runs them; see
docs/development.md.)"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _catalogue():
    spec = importlib.util.spec_from_file_location("mutants", ROOT / "tools" / "mutants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("mutants", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.MUTANTS


MUTANTS = _catalogue()


def test_names_are_unique_and_every_area_is_covered():
    names = [m.name for m in MUTANTS]
    assert len(names) == len(set(names))
    assert {m.area for m in MUTANTS} == {"ops", "graphs", "analysis", "data", "train"}
    assert len(MUTANTS) >= 20


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_mutant_applies_to_the_code_as_it_is(mutant):
    text = (ROOT / mutant.path).read_text()
    for old, new in mutant.edits:
        assert old != new
        assert text.count(old) == 1, (
            f"{mutant.name}: its text no longer occurs exactly once in {mutant.path} (the code moved on): "
            "update the mutant in tools/mutants.py so it plants the same bug"
        )
        text = text.replace(old, new)
    compile(text, mutant.path, "exec")  # the mutant is still Python
    for test in mutant.tests:
        assert (ROOT / test.split("::")[0]).exists(), test
