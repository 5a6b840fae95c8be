"""The documentation site builds in strict mode, and what MkDocs cannot check is checked here."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# the packages with a reference page; each page must show every name in the package's __all__
REFERENCE = ("graphs", "ops", "attention", "models", "analysis", "data", "train")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _docs_tools_missing() -> str | None:
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[docs]')"
    return None


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """``mkdocs build --strict`` into a temporary folder (about 2 s); the folder of the built site."""
    missing = _docs_tools_missing()
    if missing:
        pytest.skip(missing)
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir",
         str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    return out


def test_site_builds_in_strict_mode(site):
    assert (site / "index.html").is_file()
    assert (site / "reference" / "graphs" / "index.html").is_file()


@pytest.mark.parametrize("package", REFERENCE)
def test_reference_pages_show_every_public_name(site, package):
    """Lazily exported names (``hopformer.train``, ``hopformer.data``, ``hopformer.ops``) included."""
    module = importlib.import_module(f"hopformer.{package}")
    page = (site / "reference" / package / "index.html").read_text()
    missing = [name for name in module.__all__ if f'id="hopformer.{package}.{name}"' not in page]
    assert not missing, f"docs/reference/{package}.md does not show {missing}"


def _markdown_links() -> list[tuple[Path, str]]:
    links = []
    for page in sorted(DOCS.rglob("*.md")):
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # not inside code blocks
        text = re.sub(r"`[^`\n]*`", "", text)
        links += [(page, target) for target in LINK.findall(text)]
    return links


def test_links_that_leave_docs_point_at_something():
    """MkDocs cannot check relative links out of docs/ (to study folders): each must exist here."""
    outside = []
    for page, target in _markdown_links():
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL, or an anchor on the same page
        path = (page.parent / target.split("#")[0]).resolve()
        if DOCS not in path.parents and path != DOCS:
            outside.append(target)
            assert ROOT in path.parents, f"{page.name}: {target} leaves the repository"
            assert path.exists(), f"{page.name}: {target} does not exist ({path})"
    assert outside, "no links out of docs/ were found: the link pattern is wrong"


def test_gallery_page_shows_every_picture_with_its_call():
    spec = importlib.util.spec_from_file_location("gallery", DOCS / "gallery.py")
    gallery = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gallery)
    page = (DOCS / "attentions.md").read_text()
    for name, call in gallery.GALLERY:
        assert (DOCS / "figures" / "patterns" / f"{name}.png").is_file(), f"run python docs/gallery.py ({name})"
        assert f"(figures/patterns/{name}.png)<br>`{call}`" in page, f"attentions.md does not show {name}: {call}"
        eval(call, vars(gallery))  # the call still builds a graph
