"""Name -> attention module class, so models, configs and the CLI can name an attention by string."""

from __future__ import annotations

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
    return _REGISTRY[name](dim=dim, heads=heads, **options)


def _load_builtin() -> None:
    # Importing the modules runs their @register decorators. Modules that are not built yet are skipped.
    import importlib

    for module in ("base", "sparse", "routing", "combiner"):
        try:
            importlib.import_module(f"hopformer.attention.{module}")
        except ModuleNotFoundError as error:
            if error.name != f"hopformer.attention.{module}":
                raise
