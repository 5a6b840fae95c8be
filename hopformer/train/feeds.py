"""Where a run's batches and scores come from: one small interface over the two kinds of data a run trains on.

- :class:`ExampleFeed`: a task's examples (LRA classification, masked-token pretraining), in the seeded order
  of a :class:`~hopformer.train.batches.BatchStream`; validation picks ``best/`` by accuracy.
- :class:`WindowFeed`: a byte corpus for causal language modeling; each training batch is random windows of
  the context length drawn from ``(seed, step, micro-batch)``, so resume is exact without any saved order;
  evaluation covers a whole split in non-overlapping windows and reports bits per byte, which also picks
  ``best/`` (lower is better).

The loop asks a feed for the next batch, for scores on a split, and for what to print; it never looks at
the data itself.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from hopformer.data.byte_corpus import ByteCorpus, bits, eval_windows, sample_windows, unigram_bits
from hopformer.train.batches import Runtime, mask_seed, next_training_batch, training_stream
from hopformer.train.config import Config
from hopformer.train.evaluation import evaluate
from hopformer.train.tasks import TaskData


class Feed(Protocol):
    """What the training loop needs of its data."""

    task: str
    metric: str  # the validation score that picks best/
    higher_is_better: bool

    def describe(self) -> str: ...

    def next_batch(self, step: int, micro: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
        """Model inputs, labels and the number of real tokens of micro-batch ``micro`` of step ``step``."""
        ...

    def evaluate(self, model: torch.nn.Module, split: str, max_batches: int | None = None) -> dict[str, float]: ...

    def eval_batches(self, split: str, max_batches: int | None = None) -> int: ...

    def baseline(self) -> dict[str, float]: ...

    def final_line(self, test: dict[str, float], best: float | None, tested: str) -> str: ...

    def state_dict(self) -> dict[str, int]: ...

    def load_state_dict(self, state: dict[str, int]) -> None: ...


class ExampleFeed:
    """Batches of a task's examples, in the order of a seeded :class:`BatchStream` (saved in checkpoints)."""

    metric, higher_is_better = "accuracy", True

    def __init__(self, data: TaskData, config: Config, runtime: Runtime, rows: slice | None = None) -> None:
        self.data, self.config, self.runtime = data, config, runtime
        self.task = data.spec.name
        self.stream = training_stream(data.splits["train"], config)
        self.eval_batch = config.train.eval_batch_size or config.train.batch_size
        self.rows = rows  # a process's rows of each micro-batch (distributed training); None: all

    def describe(self) -> str:
        splits = self.data.splits
        counts = "/".join(str(len(splits[split])) for split in ("train", "val", "test"))
        return (
            f"{self.config.task}: {counts} examples from {self.data.source}; "
            f"majority-class rate (test) {self.data.majority_rate('test'):.1%}"
        )

    def next_batch(self, step: int, micro: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
        examples = next_training_batch(self.data.splits["train"], self.stream, self.config)
        if self.rows is None:
            return self.runtime.batch(examples, mask_seed(self.config, step, micro))
        return self.runtime.batch(examples, mask_seed(self.config, step, micro), rows=self.rows)

    def evaluate(self, model: torch.nn.Module, split: str, max_batches: int | None = None) -> dict[str, float]:
        return evaluate(model, self.data.splits[split], self.runtime, self.eval_batch, max_batches)

    def eval_batches(self, split: str, max_batches: int | None = None) -> int:
        batches = math.ceil(len(self.data.splits[split]) / self.eval_batch)
        return batches if max_batches is None else min(batches, max_batches)

    def baseline(self) -> dict[str, float]:
        return {"majority_rate": self.data.majority_rate("test")}

    def final_line(self, test: dict[str, float], best: float | None, tested: str) -> str:
        masked = self.config.train.objective == "masked"
        versus = "over hidden tokens" if masked else f"majority class {self.data.majority_rate('test'):.4f}"
        best_text = "none" if best is None else f"{best:.4f}"
        return f"best val accuracy {best_text}; test accuracy {test['accuracy']:.4f} of the {tested} weights ({versus})"

    def state_dict(self) -> dict[str, int]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.stream.load_state_dict(state)


class WindowFeed:
    """Causal language modeling on a byte corpus: random training windows, whole-split evaluation."""

    metric, higher_is_better = "bits_per_byte", False

    def __init__(
        self, corpus: ByteCorpus, config: Config, runtime: Runtime, task: str = "bytes", rows: slice | None = None
    ) -> None:
        self.corpus, self.config, self.runtime, self.task = corpus, config, runtime, task
        self.rows = rows  # a process's rows of each micro-batch's windows (distributed training); None: all
        self.context = config.data.max_length
        self.micro_batch = config.train.batch_size // config.train.grad_accum
        self.eval_batch = config.train.eval_batch_size or config.train.batch_size
        for split, data in corpus.splits.items():
            if len(data) < 2:
                raise ValueError(f"{corpus.source}: the {split} split holds {len(data)} bytes; nothing to predict")
        if len(corpus.splits["train"]) <= self.context:
            raise ValueError(
                f"{corpus.source}: the training split ({len(corpus.splits['train']):,} bytes) is not longer than one "
                f"window of data.max_length={self.context}"
            )
        self._unigram: float | None = None

    def describe(self) -> str:
        return (
            f"{self.task}: {self.corpus.describe()}; windows of {self.context} bytes; unigram baseline "
            f"{self.baseline()['unigram_bits_per_byte']:.3f} bits per byte (test)"
        )

    def next_batch(self, step: int, micro: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
        generator = torch.Generator().manual_seed(mask_seed(self.config, step, micro))
        windows = sample_windows(self.corpus.splits["train"], self.micro_batch, self.context + 1, generator)
        if self.rows is not None:  # the windows of the whole micro-batch are drawn, then this process's kept
            windows = windows[self.rows]
        windows = windows.to(self.runtime.device, non_blocking=True)
        return {"input_ids": windows[:, :-1]}, windows[:, 1:], windows.shape[0] * self.context

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, split: str, max_batches: int | None = None) -> dict[str, float]:
        """Mean NLL (nats), bits per byte and next-byte accuracy over a split in non-overlapping windows of the
        context (every byte after the split's first predicted once, with the context its window gives it);
        ``max_batches`` stops after that many batches of windows."""
        was_training = model.training
        model.eval()
        nll, correct, count = 0.0, 0, 0
        for batch in self._batches(split, max_batches):
            inputs, targets, first = batch
            with self.runtime.context():
                logits = model(inputs.to(self.runtime.device)).float()
            targets = targets.to(self.runtime.device)
            losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
            scored = torch.arange(targets.shape[1], device=targets.device)[None, :] >= first.to(targets.device)
            nll += float(losses[scored].sum())
            correct += int((logits.argmax(-1) == targets)[scored].sum())
            count += int(scored.sum())
        model.train(was_training)
        loss = nll / max(count, 1)
        return {"loss": loss, "bits_per_byte": bits(loss), "accuracy": correct / max(count, 1), "count": count}

    def _batches(self, split: str, max_batches: int | None):
        """Full windows in batches of ``eval_batch``; the split's last, shorter window alone."""
        pending, firsts, done = [], [], 0
        for window, first in eval_windows(self.corpus.splits[split], self.context):
            if len(window) < self.context + 1:  # the tail of the split
                yield window[None, :-1], window[None, 1:], torch.tensor([[first]])
                continue
            pending.append(window)
            firsts.append(first)
            if len(pending) == self.eval_batch:
                stacked = torch.stack(pending)
                yield stacked[:, :-1], stacked[:, 1:], torch.tensor(firsts)[:, None]
                pending, firsts, done = [], [], done + 1
                if max_batches is not None and done >= max_batches:
                    return
        if pending:
            stacked = torch.stack(pending)
            yield stacked[:, :-1], stacked[:, 1:], torch.tensor(firsts)[:, None]

    def eval_batches(self, split: str, max_batches: int | None = None) -> int:
        windows = max(1, math.ceil((len(self.corpus.splits[split]) - 1) / self.context))
        batches = math.ceil(windows / self.eval_batch)
        return batches if max_batches is None else min(batches, max_batches)

    def baseline(self) -> dict[str, float]:
        if self._unigram is None:
            self._unigram = unigram_bits(self.corpus.splits["train"], self.corpus.splits["test"])
        return {"unigram_bits_per_byte": self._unigram}

    def final_line(self, test: dict[str, float], best: float | None, tested: str) -> str:
        unigram = self.baseline()["unigram_bits_per_byte"]
        best_text = "none" if best is None else f"{best:.4f}"
        return (
            f"best val bits per byte {best_text}; bits per byte {test['bits_per_byte']:.4f} on test of the {tested} "
            f"weights (unigram baseline {unigram:.4f}; non-overlapping windows of {self.context} bytes, "
            f"{test['count']:,} bytes predicted)"
        )

    def state_dict(self) -> dict[str, int]:
        return {}  # the windows come from (seed, step, micro-batch): nothing to save

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
