"""The package's layers: imports only point down (DESIGN.md), and no module-level import cycle exists."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hopformer"
# Bottom to top; a module may import its own layer and the layers below it.
LAYERS = [
    {"checks", "__init__"},
    {"graphs"},
    {"ops"},
    {"attention"},
    {"models"},
    {"analysis", "data", "hf"},
    {"train", "bench"},
    {"cli", "__main__"},
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """``(imported hopformer module, at module level)`` for every import in the file."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [(name, id(node) in top) for name in names if name.split(".")[0] == "hopformer"]
    return found


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, names in enumerate(LAYERS) if part.removesuffix(".py") in names)


def test_imports_point_down():
    modules = _modules()
    upward = []
    for name, path in modules.items():
        for imported, _ in _imports(path):
            target = imported if imported in modules else imported.rsplit(".", 1)[0]
            if target in modules and _layer(target) > _layer(name):
                upward.append(f"{name} -> {target}")
    assert not upward, "imports that point up the layers: " + ", ".join(sorted(set(upward)))


def test_no_import_cycles():
    modules = _modules()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for imported, top_level in _imports(path):
            target = imported if imported in modules else imported.rsplit(".", 1)[0]
            if top_level and target in modules and target != name:
                edges[name].add(target)
    # a package's __init__ importing its own submodules is how packages work, not a cycle
    for name in list(edges):
        edges[name] = {t for t in edges[name] if not (t.startswith(name + ".") and modules[name].name == "__init__.py")}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert not cycles, "module-level import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
