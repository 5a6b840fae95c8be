"""What a run logs: ``metrics.jsonl`` (and TensorBoard), the training window behind each log line, its cost."""

from __future__ import annotations

import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from hopformer.checks import file_error

METRICS_NAME = "metrics.jsonl"
RESULTS_NAME = "results.json"


def read_metrics(path: Path, warn: bool = True) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``. A damaged *last* line (a run killed mid-write) is dropped, with one
    warning when ``warn``; a damaged line before it, or a file that is not UTF-8, is a
    :class:`~hopformer.checks.FileFormatError` naming the file and the line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise file_error(path, "not a UTF-8 metrics log", error) from None
    numbered = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    records = []
    for index, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an object")
        except ValueError as error:
            if index == len(numbered) - 1:  # the line a killed run was writing: the records before it stand
                if warn:
                    warnings.warn(f"{path}, line {number}: dropped a damaged last record ({error})", stacklevel=2)
                break
            raise file_error(path, "not a JSON record", error, line=number) from None
        records.append(record)
    return records


class MetricsLog:
    """``metrics.jsonl`` (and TensorBoard when installed); ``truncate`` drops records after a step."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.path = run_dir / METRICS_NAME
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # TensorBoard is optional
                pass

    def truncate(self, step: int) -> None:
        """Keep the records up to ``step``: a resumed run rewrites what the crashed one logged after it."""
        if not self.path.exists():
            return
        records = read_metrics(self.path)
        kept = [r for r in records if r.get("step", 0) <= step and r.get("split") != "test"]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "split"):
                    self.writer.add_scalar(f"{record['split']}/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Window:
    """Running sums of the training batches since the last log line, and the steps and time they took.

    ``loss`` and ``correct`` stay on the device (no sync per step). The sums (:meth:`sums`) are part of the
    checkpoint, so a run stopped between two log lines logs the same numbers; the timing is not.
    """

    def __init__(self, sums: dict[str, Any] | None = None) -> None:
        self.reset()
        for key, value in (sums or {}).items():
            setattr(self, key, value)

    def reset(self) -> None:
        """Empty sums, and the clock restarted."""
        self.loss: float | torch.Tensor = 0.0
        self.correct: int | torch.Tensor = 0
        self.count, self.tokens = 0, 0
        self.restart_clock()

    def add(self, loss: torch.Tensor, right: torch.Tensor, scored: int, tokens: int) -> None:
        """Count one micro-batch: its mean loss over ``scored`` items, ``right`` of them correct."""
        self.loss += loss.detach() * scored
        self.correct += right
        self.count += scored
        self.tokens += tokens

    def restart_clock(self) -> None:
        """Time (tokens/s, steps/s) from now: training time only, not evaluations."""
        self.start, self.steps = time.perf_counter(), 0

    def sums(self) -> dict[str, float | int]:
        """The running sums as plain numbers, as checkpoints save them."""
        return {
            "loss": float(self.loss),
            "correct": int(self.correct),
            "count": int(self.count),
            "tokens": int(self.tokens),
        }

    def record(self, step: int, lr: float) -> dict[str, Any]:
        """The ``train`` log record of the window at ``step``."""
        elapsed = time.perf_counter() - self.start
        return {
            "step": step,
            "split": "train",
            "loss": float(self.loss) / self.count,
            "accuracy": int(self.correct) / self.count,
            "lr": lr,
            "tokens_per_s": self.tokens / max(elapsed, 1e-9),
            "steps_per_s": self.steps / max(elapsed, 1e-9),
        }


def training_cost(run_dir: Path) -> dict[str, float]:
    """Median training steps/s and the largest CUDA peak memory (MiB) logged in ``metrics.jsonl``
    (all segments of a resumed run); what is not logged is left out."""
    records = read_metrics(run_dir / METRICS_NAME, warn=False)
    train_records = [r for r in records if r.get("split") == "train"]
    cost = {}
    speeds = [r["steps_per_s"] for r in train_records if "steps_per_s" in r]
    if speeds:
        cost["steps_per_s"] = statistics.median(speeds)
    peaks = [r["peak_memory_mib"] for r in train_records if "peak_memory_mib" in r]
    if peaks:
        cost["peak_memory_mib"] = max(peaks)
    return cost
