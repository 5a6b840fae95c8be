"""Argument checks shared by every layer, so a bad value fails at the door with its name in the error."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class InputTypeError(TypeError, ValueError):
    """An argument of the wrong type or dtype. Both a ``TypeError`` and a ``ValueError`` (as numpy's
    ``AxisError`` is both a ``ValueError`` and an ``IndexError``), so callers that catch bad input as
    either see it."""


class FileFormatError(ValueError):
    """A file that exists but cannot be read as what it should be (truncated, empty, not UTF-8, malformed,
    the wrong columns). The message names the file and the reason; a ``ValueError``, so code that catches bad
    input as one sees it, and ``hopformer`` prints it as one line."""


def file_error(path: Any, reason: str, error: BaseException | None = None, line: int | None = None) -> FileFormatError:
    """A :class:`FileFormatError` ``"PATH[, line N]: reason (the underlying error)"``, to raise."""
    detail = f" ({type(error).__name__}: {' '.join(str(error).split())[:200]})" if error is not None else ""
    where = f"{path}, line {line}" if line is not None else str(path)
    return FileFormatError(f"{where}: {reason}{detail}")


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` (``results.json``, ``META.json``); damaged or not an object: an error
    naming the file."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise file_error(path, "not a valid JSON file (truncated or damaged?)", error) from None
    if not isinstance(value, dict):
        raise file_error(path, f"expected a JSON object, got a {type(value).__name__}")
    return value


def check_int(
    name: str, value: Any, low: int | None = None, high: int | None = None, allowed: str | None = None
) -> int:
    """``value`` must be an integer (not a bool) in ``[low, high]``; raises ValueError naming ``name``.

    ``allowed`` replaces the generated description of the range in the message ("a positive integer").
    """
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and ((low is not None and value < low) or (high is not None and value > high)):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be {allowed or _describe_range(low, high)}, got {value!r}")
    return value


def _symbolic(value: Any) -> bool:
    """A number torch.compile traces symbolically (a float setting that differs between two compiled models): its
    value is unknown while tracing, and it was checked where it was set."""
    import torch  # (torch is imported by then whenever a value can be symbolic)

    return isinstance(value, (torch.SymFloat, torch.SymInt))


def check_probability(name: str, value: Any) -> float:
    """A dropout rate: a finite number in ``[0, 1)``; raises ValueError naming ``name``."""
    if _symbolic(value):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def check_finite(name: str, value: Any, *, positive: bool = False) -> float:
    """A finite real number (``positive``: > 0); raises ValueError naming ``name``. NaN and inf are refused."""
    if _symbolic(value):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _describe_range(low: int | None, high: int | None) -> str:
    if low == 1 and high is None:
        return "a positive integer"
    if low == 0 and high is None:
        return "a non-negative integer"
    if low is not None and high is not None:
        return f"an integer in [{low}, {high}]"
    if low is not None:
        return f"an integer >= {low}"
    if high is not None:
        return f"an integer <= {high}"
    return "an integer"
