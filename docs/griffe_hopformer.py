"""griffe extensions for hopformer's API reference (loaded by ``mkdocs.yml``).

- :class:`SphinxRoles`: hopformer's docstrings cross-reference with Sphinx roles (``:func:`build```,
  ``:class:`~x.Y```); the Markdown renderer would print them verbatim, so each becomes a code span of
  its target (after ``~`` only the last part, as Sphinx shows it).
- :class:`LenientDocstrings`: no docstring-style warnings for the modules named in ``mkdocs.yml``.
- :class:`LazyExports`: ``hopformer.train``, ``hopformer.data`` and ``hopformer.ops`` import some
  public names on first use (a module ``__getattr__``) so that ``import hopformer`` stays light.
  griffe reads code without running it and would not see those names, so the reference pages of the
  packages would miss them. This extension reads the two lazy forms used in the code, an ``_EXPORTS =
  {"name": "submodule"}`` dict and ``from module import name`` statements inside ``__getattr__``, and
  adds each name to its package as an alias of the object where it is defined. The pages can then
  say ``::: hopformer.train`` and list the public names, wherever inside the package they live. It
  does the same for a function imported over the submodule of its name (``hopformer.analysis.nip``),
  which griffe would otherwise show as the submodule.
"""

from __future__ import annotations

import ast
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|meth|mod|class|data|attr|obj|exc|const|term):`(~?)([^`]+)`")


def strip_roles(text: str) -> str:
    """``:func:`~a.b``` -> `` `b` ``, ``:mod:`a.b``` -> `` `a.b` ``."""
    return ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", text)


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring as Markdown code spans."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = strip_roles(obj.docstring.value)


class LenientDocstrings(griffe.Extension):
    """Turn off docstring-style warnings for the objects of ``modules`` (and their submodules).

    For packages whose docstrings describe several arguments in one entry (``q, k, v: ...``), which
    griffe's Google-style parser reports, so that the strict build still fails on everything else.
    """

    def __init__(self, modules: list[str]) -> None:
        super().__init__()
        self.modules = tuple(modules)

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and any(obj.path == m or obj.path.startswith(f"{m}.") for m in self.modules):
            obj.docstring.parser_options = {**obj.docstring.parser_options, "warnings": False}


def lazy_exports(module: griffe.Module) -> dict[str, str]:
    """``{public name: dotted path of the object}`` for the names ``module`` imports lazily, and for the
    names it imports from a submodule of the same name (``hopformer.analysis.nip`` is the function)."""
    if module.filepath is None or isinstance(module.filepath, list):
        return {}
    tree = ast.parse(module.filepath.read_text())
    found: dict[str, str] = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in targets) and isinstance(node.value, ast.Dict):
            for key, value in zip(node.value.keys, node.value.values):
                if isinstance(key, ast.Constant) and isinstance(value, ast.Constant):
                    found[key.value] = f"{module.path}.{value.value}.{key.value}"
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from pkg.nip import nip`` in ``pkg``: at run time the name is the function, not the module
            for alias in node.names:
                name = alias.asname or alias.name
                if node.module == f"{module.path}.{name}" and name in module.members and module.members[name].is_module:
                    found[name] = f"{node.module}.{alias.name}"
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and inner.module and inner.level == 0:
                    for alias in inner.names:
                        found[alias.asname or alias.name] = f"{inner.module}.{alias.name}"
    return found


class LazyExports(griffe.Extension):
    """Add the lazily imported public names of every package module as aliases of their objects."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        modules = _modules(pkg)
        plans = []
        for module in modules:
            exports = lazy_exports(module)
            for name, path in exports.items():
                member = module.members.get(name)
                if member is not None and getattr(member, "hopformer_lazy", False):
                    continue  # done already (griffe versions that call both hooks)
                plans.append((module, name, loader.modules_collection.get_member(path)))
            if exports and not module.exports:  # ``__all__ = sorted(_EXPORTS)`` is not a literal
                module.exports = sorted(exports)
        for module, name, _ in plans:
            shadowed = module.members.get(name)
            if shadowed is not None and not shadowed.is_alias and shadowed.is_module:
                _pin_aliases_into(shadowed, modules, loader)
        for module, name, target in plans:
            alias = griffe.Alias(name, target, parent=module)  # the object, not a path through the module
            alias.public = True
            alias.hopformer_lazy = True
            module.set_member(name, alias)

    on_package_loaded = on_package  # the hook's name before griffe 2


def _pin_aliases_into(submodule: griffe.Module, modules: list[griffe.Module], loader: griffe.GriffeLoader) -> None:
    """Point every alias whose path runs through ``submodule`` at its object now, before the
    submodule's name is given to the function it defines (paths through that name then fail)."""
    prefix = f"{submodule.path}."
    for module in modules:
        for member in list(module.members.values()):
            if member.is_alias and member.target_path.startswith(prefix) and member.parent is module:
                member.target = loader.modules_collection.get_member(member.target_path)


def _modules(module: griffe.Module) -> list[griffe.Module]:
    found = [module]
    for member in list(module.members.values()):
        if not member.is_alias and member.is_module:
            found.extend(_modules(member))
    return found
