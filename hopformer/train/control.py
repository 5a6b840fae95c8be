"""When a run stops early: time limits (:class:`TimeBudget`) and Ctrl-C / SIGTERM (:class:`StopFlag`).

Either way the loop finishes the current step, saves ``last/`` and returns; ``--resume`` continues exactly.
"""

from __future__ import annotations

import math
import signal
import statistics
import threading
import time
from collections import deque
from typing import Any

clock = time.monotonic
"""The clock of time limits and deadlines (tests replace it)."""
TIME_LIMIT_MARGIN_S = 30.0
"""Safety margin of a time limit: ``min(30 s, 10% of the limit)`` is kept free at the end."""


def run_deadline(started: float, limit_minutes: float | None, deadline: float | None) -> float | None:
    """The :data:`clock` time to stop by: the earlier of ``deadline`` and ``limit_minutes`` after ``started``."""
    if limit_minutes is None:
        return deadline
    return min(deadline if deadline is not None else math.inf, started + 60.0 * limit_minutes)


def margin_seconds(limit_minutes: float | None, deadline: float | None, started: float) -> float:
    """Seconds kept free before the deadline: ``min(30 s, 10% of the time allowed)``."""
    if deadline is None:
        return 0.0
    allowed = 60.0 * limit_minutes if limit_minutes is not None else deadline - started
    return min(TIME_LIMIT_MARGIN_S, 0.1 * max(allowed, 0.0))


class StopFlag:
    """SIGINT (Ctrl-C) or SIGTERM: ask the loop to stop after this step and checkpoint.

    A second signal acts at once: SIGINT raises KeyboardInterrupt, SIGTERM terminates (its default).
    ``signal_name`` is the name of the first signal received.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = self.signal_name or signal.Signals(signum).name
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:  # None: a handler not installed from Python; leave what is there
                signal.signal(signum, previous)

    @property
    def reason(self) -> str | None:
        """The signal's name once one was received (``"SIGINT"`` or ``"SIGTERM"``), else None."""
        return (self.signal_name or "SIGINT") if self.requested else None


class TimeBudget:
    """Whether the next step still ends before the deadline (``deadline`` None = never stop).

    The estimate of the next step is the median of the last 25 step times (robust to the slow steps
    that compile kernels for a new shape), plus an evaluation and two checkpoints when that step
    evaluates, plus the test evaluation when it is the last, plus the checkpoint that stopping takes,
    plus the margin. Before any evaluation was timed, one is estimated at half the training time of as
    many examples.
    """

    def __init__(self, deadline: float | None, margin: float) -> None:
        self.deadline, self.margin = deadline, margin
        self.step_times: deque[float] = deque(maxlen=25)
        self.eval_seconds: float | None = None
        self.checkpoint_seconds = 1.0

    def remaining(self) -> float:
        """Seconds left before the deadline (infinite without one)."""
        return math.inf if self.deadline is None else self.deadline - clock()

    def expired(self) -> bool:
        """Too late to start anything but the stop checkpoint."""
        return self.remaining() < self.checkpoint_seconds + self.margin

    def next_step_fits(self, evaluates: bool, saves: bool, last: bool, eval_examples: int, test_ratio: float,
                       batch_size: int) -> bool:  # fmt: skip
        """Whether the next step (with the evaluation and checkpoints it brings) ends in time."""
        if self.deadline is None or not self.step_times:
            return True
        step = statistics.median(self.step_times)
        evaluation = self.eval_seconds if self.eval_seconds is not None else 0.5 * step * eval_examples / batch_size
        need = step + self.checkpoint_seconds + self.margin
        if evaluates:
            need += evaluation + 2 * self.checkpoint_seconds
        elif saves:
            need += self.checkpoint_seconds
        if last:
            need += evaluation * test_ratio
        return need <= self.remaining()
