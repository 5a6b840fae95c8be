"""What depends only on a graph and a length is a constant of a traced program, never a traced computation.

A graph, its token mask and the kernels' index tables (gather plans, tile lists, block masks) are built from the
graph's index tensors with data-dependent Python (``.tolist()``, loops over blocks, boolean indexing). Tracers must
not see that work:

- ``torch.export`` runs the model's Python under fake tensors: :func:`eager_constants` builds such values with real
  tensors even then, so they enter the exported program as constants.
- ``torch.compile`` (Dynamo) reads the model's Python bytecode: :func:`trace_constant` builds the value while Dynamo
  traces, outside the trace, and hands Dynamo the finished object as an attribute of a holder object (an ordinary
  guarded attribute, so Dynamo may read its fields, properties and methods). Building happens once per key.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def exporting() -> bool:
    """Whether ``torch.export`` is tracing now. Not ``torch.compiler.is_exporting()`` itself: before PyTorch 2.13,
    Dynamo folds that call to True in every ``torch.compile`` trace, which sent compiled models down the export
    paths. The flag it stands for is what export sets and what Dynamo reads from 2.13 on."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


@contextlib.contextmanager
def eager_constants() -> Iterator[None]:
    """Build what depends only on a graph and a length (the graph itself, its token mask, gather plans) eagerly,
    even while ``torch.export`` traces a model: they become constants of the exported program instead of traced
    computations on the graph's index tensors, whose values would be data-dependent guards. A no-op otherwise."""
    if not exporting():
        yield
        return
    from torch.utils._python_dispatch import _disable_current_modes  # the tracer's fake and proxy modes

    with _disable_current_modes():
        yield


class _Held:
    """Values built while Dynamo traces, one attribute each (see :func:`trace_constant`)."""


_HELD = _Held()
_NAMES: dict[Hashable, str] = {}


@torch.compiler.assume_constant_result
def _hold(build: Callable[..., Any], args: tuple) -> str:
    # Runs eagerly while Dynamo traces (its arguments are constants). The value goes into an attribute of _HELD,
    # not a dict: Dynamo snapshots a dict when the trace first reads it, but reads attributes when asked.
    key = (build, args)
    name = _NAMES.get(key)
    if name is None:
        with eager_constants():
            value = build(*args)
        name = f"value{len(_NAMES)}"
        setattr(_HELD, name, value)
        _NAMES[key] = name
    return name


def trace_constant(build: Callable[..., T], *args: Hashable) -> T:
    """``build(*args)`` for a value that depends on constants only (strings, numbers, tuples of them, functions):
    under Dynamo built once per ``(build, args)`` outside the trace and read as a guarded constant; otherwise
    simply called (``build`` keeps its own cache)."""
    if torch.compiler.is_dynamo_compiling():
        return getattr(_HELD, _hold(build, args))
    return build(*args)


def static_int(value: Any) -> int:
    """A size as a Python ``int``. Under ``torch.compile`` with dynamic shapes a symbolic size is specialised (a
    guard on its value): graphs and their plans are built per sequence length."""
    return len(range(value))  # Dynamo evaluates range() on a concrete value: the specialising spelling
