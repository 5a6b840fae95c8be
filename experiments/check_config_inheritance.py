"""Resolve configs that name a ``base:`` and check them against what the files said before they were shortened.

The semantics are those of the config loader's inheritance: a top-level ``base: other.yaml`` (a path relative to
the file that names it) is loaded first, recursively, then the file's own keys are deep-merged over it (mappings
key by key; any other value, lists included, replaces). Command-line overrides come after that, in the loader.

    python experiments/check_config_inheritance.py                      # every config against baseline-pre-house
    python experiments/check_config_inheritance.py --ref 9961704 configs/lra/listops_pytorch_long.yaml

For every config in ``configs/`` and ``experiments/configs/`` (or the files given) it compares the resolved
mapping with ``yaml.safe_load`` of the file as it was at ``--ref`` (``experiments/configs/X`` was
``configs/lra/X`` then) and prints each difference. Exit status 1 if any config differs.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIRS = ("configs", "experiments/configs")
MOVED = {"experiments/configs/": "configs/lra/"}  # where a config lay before it moved here


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` deep-merged over ``base``: mappings key by key, anything else (lists too) replaces."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping a config file stands for once its ``base:`` chain is applied."""
    path = Path(path).resolve()
    if path in _seen:
        raise ValueError(f"config {path}: base chain loops: {' -> '.join(str(p) for p in (*_seen, path))}")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"config {path}: must hold a mapping, got {type(values).__name__}")
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str):
        raise ValueError(f"config {path}: base must be a file name, got {base!r}")
    return merge(resolve(path.parent / base, (*_seen, path)), values)


def shipped_configs() -> list[Path]:
    return sorted(p for folder in CONFIG_DIRS for p in (ROOT / folder).rglob("*.yaml"))


def original(rel: str, ref: str) -> dict[str, Any]:
    """``yaml.safe_load`` of the config as it was at git ``ref`` (at its old path if it moved)."""
    for new, old in MOVED.items():
        if rel.startswith(new):
            rel = old + rel[len(new) :]
    text = subprocess.run(["git", "show", f"{ref}:{rel}"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return yaml.safe_load(text) or {}


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Human-readable differences between two loaded YAML values (a: resolved now, b: before)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            here = f"{where}.{key}" if where else str(key)
            if key not in a:
                out.append(f"{here}: missing now (was {b[key]!r})")
            elif key not in b:
                out.append(f"{here}: new ({a[key]!r})")
            else:
                out += differences(a[key], b[key], here)
        return out
    if a != b or type(a) is not type(b):
        return [f"{where}: {a!r} now, {b!r} before"]
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", help="config files (default: all in configs/ and experiments/configs/)")
    parser.add_argument("--ref", default="baseline-pre-house", help="git revision of the configs before (%(default)s)")
    args = parser.parse_args(argv)
    paths = [Path(p).resolve() for p in args.configs] or shipped_configs()
    failed = 0
    for path in paths:
        rel = path.relative_to(ROOT).as_posix()
        try:
            found = differences(resolve(path), original(rel, args.ref))
        except (subprocess.CalledProcessError, ValueError, OSError) as error:
            found = [f"cannot compare: {getattr(error, 'stderr', '') or error}".strip()]
        base = (yaml.safe_load(path.read_text()) or {}).get("base")
        print(f"{'DIFFERS' if found else 'same   '}  {rel}" + (f"  (base: {base})" if base else ""))
        for line in found:
            print(f"           {line}")
        failed += bool(found)
    print(f"{len(paths) - failed} of {len(paths)} configs resolve to what they were at {args.ref}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
