"""Name -> attention module class, so models, configs and the CLI can name an attention by string."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable

from torch import nn

_REGISTRY: dict[str, type[nn.Module]] = {}


def register(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make ``build(name, ...)`` construct this attention module."""

    def decorate(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"attention {name!r} is already registered to {_REGISTRY[name].__name__}")
        _REGISTRY[name] = cls
        return cls

    return decorate


def name_of(module: nn.Module) -> str | None:
    """The registered name of an attention module's class (``"diffuser"``...), or None."""
    _load_builtin()
    return next((name for name, cls in _REGISTRY.items() if type(module) is cls), None)


def available() -> list[str]:
    """Names accepted by :func:`build`, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def build(name: str, dim: int, heads: int, **options) -> nn.Module:
    """Construct the attention module registered as ``name``.

    Every module maps ``(batch, seq, dim)`` to ``(batch, seq, dim)`` through
    ``forward(x, attention_mask=None)`` where ``attention_mask`` is HF-style (1 = real token).
    ``options`` are the module's own keyword arguments (window, hops, alpha, ...).
    """
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"attention={name!r} is not known; choose one of {available()}")
    try:
        return _REGISTRY[name](dim=dim, heads=heads, **options)
    except TypeError as error:  # a misspelt or misplaced option: say which, and what the attention takes
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(error))
        if unknown is None or unknown.group(1) not in options:
            raise
        key = unknown.group(1)
        raise ValueError(
            f"attention={name!r} has no option {key!r} (got {key}={options[key]!r}); "
            f"it takes {option_names(name, options.get('pattern'))}"
        ) from error


def option_names(name: str, pattern: str | None = None) -> list[str]:
    """The keyword options that ``build(name, dim, heads, ...)`` accepts, sorted: the module's own and, for
    attentions on a graph, those of its graph pattern (``pattern``, else the one named like the attention)."""
    _load_builtin()
    cls = _REGISTRY[name]
    names: set[str] = set()
    functions = [klass.__init__ for klass in cls.__mro__ if "__init__" in vars(klass) and klass is not nn.Module]
    from hopformer.attention.sparse import GraphAttention
    from hopformer.graphs import PATTERNS

    pattern = pattern or name
    if issubclass(cls, GraphAttention) and pattern in PATTERNS:
        functions.append(PATTERNS[pattern])
    for function in functions:
        for parameter in inspect.signature(function).parameters.values():
            if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
                names.add(parameter.name)
    fixed = set() if "pattern" in inspect.signature(cls.__init__).parameters else {"pattern"}  # e.g. bigbird's
    return sorted(names - {"self", "dim", "heads", "seq_len"} - fixed)


def _load_builtin() -> None:
    # Importing the modules runs their @register decorators. Modules that are not built yet are skipped.
    import importlib

    for module in ("base", "sparse", "routing", "combiner"):
        try:
            importlib.import_module(f"hopformer.attention.{module}")
        except ModuleNotFoundError as error:
            if error.name != f"hopformer.attention.{module}":
                raise
