"""Mutation testing: plant one small bug at a time (``tools/mutants.py``) and check that the test suite catches it.

    python tools/mutation.py                        # every mutant, each against its own tests
    python tools/mutation.py --list                 # the catalogue
    python tools/mutation.py heat-kernel-k-plus-one-factorial 'checkpoint-*'   # some (names or globs)
    python tools/mutation.py --area train --jobs 2  # one area, two mutants at a time
    python tools/mutation.py --suite                # each mutant against the whole suite (slow)
    python tools/mutation.py --json mutation.json   # also write the results as JSON

The working tree is never touched: its files (tracked, and untracked ones git does not ignore) are copied to a
temporary folder, and each mutant is applied there, run, and undone. First the selected tests run once
unmutated (they must pass, or nothing below means anything). A mutant is *caught* when its tests fail; the
report names the failing tests. A mutant whose text no longer matches the code is *stale* (update it in
``tools/mutants.py``). Exit status 0 when every mutant is caught.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from mutants import MUTANTS, Mutant  # noqa: E402

FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)")


@dataclass
class Result:
    mutant: Mutant
    status: str  # caught, survived, stale, timeout
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    output: str = ""


def apply(text: str, mutant: Mutant) -> str:
    """The mutated text; raises ValueError when an ``old`` text does not occur exactly once."""
    for old, new in mutant.edits:
        count = text.count(old)
        if count != 1:
            raise ValueError(f"{mutant.name}: {old[:60]!r}... occurs {count} times in {mutant.path}, not once")
        text = text.replace(old, new)
    return text


def copy_tree(destination: Path) -> Path:
    """The repository's files (tracked, and untracked files git does not ignore) copied to ``destination``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


def pytest(tree: Path, tests: list[str], maxfail: int, timeout: float) -> tuple[int | None, str]:
    """Run pytest on ``tests`` in ``tree``; returns (exit code or None on timeout, output)."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", f"--maxfail={maxfail}", *tests]
    # no bytecode: a mutant and its undoing can share a file's size and modification second
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        out = error.stdout.decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
        return None, out
    return done.returncode, done.stdout + done.stderr


def run_mutant(tree: Path, mutant: Mutant, tests: list[str], maxfail: int, timeout: float) -> Result:
    path = tree / mutant.path
    original = path.read_text()
    try:
        mutated = apply(original, mutant)
    except ValueError as error:
        return Result(mutant, "stale", output=str(error))
    began = time.monotonic()
    path.write_text(mutated)
    try:
        code, output = pytest(tree, tests, maxfail, timeout)
    finally:
        path.write_text(original)
    seconds = time.monotonic() - began
    failures = [match.group(1) for line in output.splitlines() if (match := FAILED.match(line))]
    if code is None:
        return Result(mutant, "timeout", failures, seconds, output)
    if code == 0:
        return Result(mutant, "survived", [], seconds, output)
    if code in (1, 2) and failures:  # tests failed, or a test module no longer imports
        return Result(mutant, "caught", failures, seconds, output)
    return Result(mutant, "error", failures, seconds, output)  # no tests ran, or pytest broke: look at it


def select(names: list[str], area: str | None) -> list[Mutant]:
    chosen = [m for m in MUTANTS if area is None or m.area == area]
    if names:
        chosen = [m for m in chosen if any(fnmatch.fnmatch(m.name, pattern) for pattern in names)]
    if not chosen:
        raise SystemExit(f"no mutant matches {names or ''} {area or ''}".strip())
    return chosen


def report(results: list[Result]) -> str:
    lines = ["| mutant | area | caught? | by (failing tests) | seconds |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        by = ", ".join(f"`{name}`" for name in r.failures[:3]) + (" ..." if len(r.failures) > 3 else "")
        verdict = {"caught": "yes", "survived": "**NO**"}.get(r.status, f"**{r.status}**")
        lines.append(f"| `{r.mutant.name}` | {r.mutant.area} | {verdict} | {by or '-'} | {r.seconds:.0f} |")
    caught = sum(r.status == "caught" for r in results)
    lines.append("")
    lines.append(f"{caught} of {len(results)} mutants caught")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="mutant names or globs (default: all)")
    parser.add_argument("--area", choices=sorted({m.area for m in MUTANTS}))
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--suite", action="store_true", help="run the whole suite (tests/) against every mutant")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at a time, each in its own copy")
    parser.add_argument("--maxfail", type=int, default=3, help="stop a mutant's run after this many failures")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per mutant (then: timeout, not caught)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the selected tests")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--verbose", action="store_true", help="print the pytest output of mutants not caught")
    args = parser.parse_args(argv)

    mutants = select(args.names, args.area)
    if args.list:
        for mutant in mutants:
            print(f"{mutant.name:42s} {mutant.area:9s} {mutant.path}\n{'':52s}{mutant.bug}")
        return 0

    def tests_of(mutant: Mutant) -> list[str]:
        return ["tests"] if args.suite else list(mutant.tests)

    jobs = max(1, min(args.jobs, len(mutants)))
    with tempfile.TemporaryDirectory(prefix="hopformer-mutation-") as scratch:
        trees = [copy_tree(Path(scratch) / f"tree{i}") for i in range(jobs)]
        if not args.no_baseline:
            union = sorted({t for m in mutants for t in tests_of(m)})
            print(f"baseline: {' '.join(union)}", flush=True)
            code, output = pytest(trees[0], union, 1, args.timeout)
            if code != 0:
                print(output[-5000:])
                print("the unmutated tests do not pass: fix that first (or pass --no-baseline)")
                return 2
        free = list(trees)
        results: dict[str, Result] = {}

        def work(mutant: Mutant) -> Result:
            tree = free.pop()
            try:
                return run_mutant(tree, mutant, tests_of(mutant), args.maxfail, args.timeout)
            finally:
                free.append(tree)

        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            for result in pool.map(work, mutants):
                results[result.mutant.name] = result
                first = result.failures[0] if result.failures else ""
                print(f"{result.status:9s} {result.mutant.name}  {first}  ({result.seconds:.0f} s)", flush=True)
                if args.verbose and result.status != "caught":
                    print(result.output[-3000:])
    ordered = [results[m.name] for m in mutants]
    print()
    print(report(ordered))
    if args.json:
        args.json.write_text(
            json.dumps(
                [
                    {"mutant": r.mutant.name, "area": r.mutant.area, "path": r.mutant.path, "bug": r.mutant.bug,
                     "status": r.status, "failures": r.failures, "seconds": round(r.seconds, 1),
                     "tests": tests_of(r.mutant)}
                    for r in ordered
                ],
                indent=2,
            )
            + "\n"
        )  # fmt: skip
    return 0 if all(r.status == "caught" for r in ordered) else 1


if __name__ == "__main__":
    sys.exit(main())
