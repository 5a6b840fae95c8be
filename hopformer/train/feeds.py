"""Where a run's batches and scores come from: one small interface over the two kinds of data a run trains on.

- :class:`ExampleFeed`: a task's examples (LRA classification, masked-token pretraining), in the seeded order
  of a :class:`~hopformer.train.batches.BatchStream`; validation picks ``best/`` by accuracy.
- :class:`WindowFeed`: a token corpus for causal language modeling; each training batch is random windows of
  the context length drawn from ``(seed, step, micro-batch)``, so resume is exact without any saved order;
  evaluation covers a whole split in non-overlapping windows and reports bits per byte (or character) or
  word perplexity, which also picks ``best/`` (lower is better).
- :class:`MaskedWindowFeed`: the same windows for a masked LM (BERT masking), scored in bits per hidden
  byte or character (perplexity for words) with masks drawn from each evaluation window's index.
- :class:`PixelFeed`: an image set for pixel modeling, a causal LM over each image's subpixels after a start
  token, scored in bits per dimension.

:func:`make_feed` picks the feed of a run.

The loop asks a feed for the next batch, for scores on a split, and for what to print; it never looks at
the data itself.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from hopformer.data.corpus import Corpus, bits, eval_windows, sample_windows, unigram_bits
from hopformer.train.batches import Runtime, hide_tokens, mask_seed, next_training_batch, training_stream
from hopformer.train.config import Config
from hopformer.train.evaluation import evaluate
from hopformer.train.tasks import TaskData, warn_truncation

PIXEL_LEVELS = 256  # 8-bit subpixels; the start token of a pixel model is id 256


def make_feed(data: Any, config: Config, runtime: Runtime, rows: slice | None = None) -> Feed:
    """The feed of a run: examples for the example tasks, windows of a corpus (causal or masked), images.
    ``rows``: a process's rows of every micro-batch (distributed training; each process draws the whole
    micro-batch a single process would, then keeps its rows); None: all."""
    if isinstance(data, TaskData):
        return ExampleFeed(data, config, runtime, rows=rows)
    if isinstance(data, Corpus):
        masked = config.train.objective == "masked"
        return (MaskedWindowFeed if masked else WindowFeed)(data, config, runtime, config.task, rows=rows)
    return PixelFeed(data, config, runtime, config.task, rows=rows)


def metric_label(metric: str) -> str:
    """How a metric reads in a sentence: ``"bits_per_byte"`` -> ``"bits per byte"``."""
    return metric.replace("_", " ")


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


# how the final line names each trivial baseline of :meth:`TaskData.baselines`
_BASELINE_NAMES = {"majority_rate": "majority class", "root_operator_rate": "root-operator rule"}


class ExampleFeed:
    """Batches of a task's examples, in the order of a seeded :class:`BatchStream` (saved in checkpoints)."""

    metric, higher_is_better = "accuracy", True

    def __init__(self, data: TaskData, config: Config, runtime: Runtime, rows: slice | None = None) -> None:
        self.data, self.config, self.runtime = data, config, runtime
        self.task = data.spec.name
        self.stream = training_stream(data.splits["train"], config)
        self.eval_batch = config.train.eval_batch_size or config.train.batch_size
        self._baselines: dict[str, float] | None = None
        warn_truncation(data.splits, runtime.max_length, f"model.max_len={runtime.max_length + runtime.prefix}")
        self.rows = rows  # a process's rows of each micro-batch (distributed training); None: all

    def describe(self) -> str:
        splits = self.data.splits
        counts = "/".join(str(len(splits[split])) for split in ("train", "val", "test"))
        rules = ", ".join(f"{_BASELINE_NAMES[key]} {value:.1%}" for key, value in self.baseline().items())
        rules = f"; trivial baselines on test: {rules}" if rules else ""
        return f"{self.config.task}: {counts} examples from {self.data.source}{rules}"

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
        if self._baselines is None:  # masked pretraining scores hidden tokens: no rule on the labels applies
            self._baselines = {} if self.config.train.objective == "masked" else self.data.baselines()
        return self._baselines

    def final_line(self, test: dict[str, float], best: float | None, tested: str) -> str:
        best_text = "none" if best is None else f"{best:.4f}"
        if self.config.train.objective == "masked":
            versus = "over hidden tokens"
        else:
            versus = ", ".join(f"{_BASELINE_NAMES[key]} {value:.4f}" for key, value in self.baseline().items())
            versus = f"trivial baselines on test: {versus}"
        return f"best val accuracy {best_text}; test accuracy {test['accuracy']:.4f} of the {tested} weights ({versus})"

    def state_dict(self) -> dict[str, int]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.stream.load_state_dict(state)


class WindowFeed:
    """Causal language modeling on a token corpus: random training windows, whole-split evaluation."""

    higher_is_better = False

    def __init__(
        self, corpus: Corpus, config: Config, runtime: Runtime, task: str = "bytes", rows: slice | None = None
    ) -> None:
        self.corpus, self.config, self.runtime, self.task = corpus, config, runtime, task
        self.rows = rows  # a process's rows of each micro-batch's windows (distributed training); None: all
        self.context = config.data.max_length
        self.micro_batch = config.train.batch_size // config.train.grad_accum
        self.eval_batch = config.train.eval_batch_size or config.train.batch_size
        self.unit = corpus.unit
        self.metric = self.score_name()
        for split, data in corpus.splits.items():
            if len(data) < 2:
                raise ValueError(
                    f"{corpus.source}: the {split} split holds {len(data)} {self.unit}s; nothing to predict"
                )
        if len(corpus.splits["train"]) <= self.context:
            raise ValueError(
                f"{corpus.source}: the training split ({len(corpus.splits['train']):,} {self.unit}s) is not longer "
                f"than one window of data.max_length={self.context}"
            )
        self._unigram: float | None = None

    def score_name(self) -> str:
        return "perplexity" if self.unit == "word" else f"bits_per_{self.unit}"

    def scores(self, nll: float, correct: int, count: int) -> dict[str, float]:
        """The scores of ``count`` predictions with ``nll`` nats in all."""
        loss = nll / max(count, 1)
        score = math.exp(loss) if self.unit == "word" else bits(loss)
        return {"loss": loss, self.metric: score, "accuracy": correct / max(count, 1), "count": count}

    def describe(self) -> str:
        baseline = next(iter(self.baseline().values()))
        return (
            f"{self.task}: {self.corpus.describe()}; windows of {self.context} {self.unit}s; unigram baseline "
            f"{baseline:.3f} {metric_label(self.metric)} (test)"
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
        """Mean NLL (nats), the corpus's score and next-token accuracy over a split in non-overlapping windows
        of the context (every token after the split's first predicted once, with the context its window gives
        it); ``max_batches`` stops after that many batches of windows."""
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
        return self.scores(nll, correct, count)

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
        """The test split's score under the training split's token frequencies alone."""
        if self._unigram is None:
            splits = self.corpus.splits
            self._unigram = unigram_bits(splits["train"], splits["test"], self.corpus.vocab_size)
        score = 2**self._unigram if self.unit == "word" else self._unigram
        return {f"unigram_{self.score_name()}": score}

    def final_line(self, test: dict[str, float], best: float | None, tested: str) -> str:
        unigram = next(iter(self.baseline().values()))
        best_text = "none" if best is None else f"{best:.4f}"
        label = metric_label(self.metric)
        return (
            f"best val {label} {best_text}; {label} {test[self.metric]:.4f} on test of the {tested} weights "
            f"(unigram baseline {unigram:.4f}; {self.protocol()}, {test['count']:,} {self.unit}s predicted)"
        )

    def protocol(self) -> str:
        return f"non-overlapping windows of {self.context} {self.unit}s"

    def state_dict(self) -> dict[str, int]:
        return {}  # the windows come from (seed, step, micro-batch): nothing to save

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class MaskedWindowFeed(WindowFeed):
    """Masked-LM on a token corpus: random windows with BERT masking (``train.mask_rate``, ``mask_policy``);
    the model predicts the hidden tokens. Evaluation: non-overlapping windows of the context, each masked from
    its own index (the same tokens every time), scored over the hidden tokens only: bits per hidden byte or
    character (the Diffuser and BigBird papers' bits per character), perplexity for words."""

    def __init__(
        self, corpus: Corpus, config: Config, runtime: Runtime, task: str = "bytes", rows: slice | None = None
    ) -> None:
        super().__init__(corpus, config, runtime, task, rows)
        self.mask_id = corpus.vocab_size  # the model's extra last id

    def score_name(self) -> str:
        return f"masked_{super().score_name()}"

    def _hide(
        self, windows: torch.Tensor, seed: int, rows: slice | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
        tc = self.config.train
        generator = torch.Generator().manual_seed(seed)
        inputs, hidden = hide_tokens(
            windows, torch.ones_like(windows, dtype=torch.bool), tc.mask_rate, self.mask_id, generator, tc.mask_policy
        )
        if rows is not None:  # the whole micro-batch is hidden as one process would, then this process's rows kept
            windows, inputs, hidden = windows[rows], inputs[rows], hidden[rows]
        device = self.runtime.device
        labels = windows[hidden].to(device, non_blocking=True)
        return {"input_ids": inputs.to(device), "select": hidden.to(device)}, labels, windows.numel()

    def next_batch(self, step: int, micro: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
        seed = mask_seed(self.config, step, micro)
        windows = sample_windows(
            self.corpus.splits["train"], self.micro_batch, self.context, torch.Generator().manual_seed(seed)
        )
        return self._hide(windows, seed + 1, self.rows)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, split: str, max_batches: int | None = None) -> dict[str, float]:
        was_training = model.training
        model.eval()
        nll, correct, count = 0.0, 0, 0
        data = self.corpus.splits[split]
        windows = len(data) // self.context
        if windows == 0:
            raise ValueError(
                f"the {split} split ({len(data):,} {self.unit}s) is shorter than one window of {self.context}"
            )
        batches = self.eval_batches(split, max_batches)
        for index in range(batches):
            first = index * self.eval_batch
            rows = [
                data[w * self.context : (w + 1) * self.context]
                for w in range(first, min(first + self.eval_batch, windows))
            ]
            batch = torch.from_numpy(np.stack(rows).astype(np.int64))
            inputs, labels, _ = self._hide(batch, 1_000_003 * (index + 1))
            with self.runtime.context():
                logits = model(**inputs).float()
            nll += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
            count += len(labels)
        model.train(was_training)
        return self.scores(nll, correct, count)

    def eval_batches(self, split: str, max_batches: int | None = None) -> int:
        batches = math.ceil(len(self.corpus.splits[split]) // self.context / self.eval_batch)
        return batches if max_batches is None else min(batches, max_batches)

    def protocol(self) -> str:
        rate = self.config.train.mask_rate
        return f"{rate:.0%} of the {self.unit}s hidden ({self.config.train.mask_policy}) in windows of {self.context}"


class PixelFeed:
    """Pixel modeling: a causal LM over each image's subpixels in raster order (the channels of a pixel
    consecutive), after a start token (id 256), so every one of the ``H x W x C`` dimensions is predicted.
    Training images are drawn at random from ``(seed, step, micro-batch)``; evaluation covers a whole split.
    Bits per dimension: the mean NLL per subpixel over ln 2."""

    metric, higher_is_better = "bits_per_dim", False

    def __init__(self, images: Any, config: Config, runtime: Runtime, task: str, rows: slice | None = None) -> None:
        self.images, self.config, self.runtime, self.task = images, config, runtime, task
        self.rows = rows  # a process's rows of each micro-batch's images (distributed training); None: all
        self.dims = int(np.prod(images.shape))
        self.micro_batch = config.train.batch_size // config.train.grad_accum
        self.eval_batch = config.train.eval_batch_size or config.train.batch_size
        for split, data in images.splits.items():
            if len(data) == 0:
                raise ValueError(f"{images.source}: the {split} split holds no images")
        self._unigram: float | None = None

    def describe(self) -> str:
        height, width, channels = self.images.shape
        return (
            f"{self.task}: {self.images.describe()}; {height} x {width} x {channels} = {self.dims} subpixels an "
            f"image; unigram baseline {self.baseline()['unigram_bits_per_dim']:.3f} bits per dim (test)"
        )

    def _batch(self, pixels: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
        targets = torch.from_numpy(np.asarray(pixels, dtype=np.int64)).to(self.runtime.device, non_blocking=True)
        start = targets.new_full((targets.shape[0], 1), PIXEL_LEVELS)
        return {"input_ids": torch.cat([start, targets[:, :-1]], dim=1)}, targets, targets.numel()

    def next_batch(self, step: int, micro: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
        generator = torch.Generator().manual_seed(mask_seed(self.config, step, micro))
        train = self.images.splits["train"]
        picks = torch.randint(0, len(train), (self.micro_batch,), generator=generator).tolist()
        if self.rows is not None:
            picks = picks[self.rows]
        return self._batch(np.stack([train[i] for i in picks]))

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, split: str, max_batches: int | None = None) -> dict[str, float]:
        """Mean NLL (nats) per subpixel, bits per dimension and accuracy over the images of a split
        (``max_batches``: only that many batches of them)."""
        was_training = model.training
        model.eval()
        data = self.images.splits[split]
        nll, correct, count = 0.0, 0, 0
        for index in range(self.eval_batches(split, max_batches)):
            inputs, targets, _ = self._batch(data[index * self.eval_batch : (index + 1) * self.eval_batch])
            with self.runtime.context():
                logits = model(**inputs).float()
            nll += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
            correct += int((logits.argmax(-1) == targets).sum())
            count += targets.numel()
        model.train(was_training)
        loss = nll / max(count, 1)
        return {"loss": loss, "bits_per_dim": bits(loss), "accuracy": correct / max(count, 1), "count": count}

    def eval_batches(self, split: str, max_batches: int | None = None) -> int:
        batches = math.ceil(len(self.images.splits[split]) / self.eval_batch)
        return batches if max_batches is None else min(batches, max_batches)

    def baseline(self) -> dict[str, float]:
        """Bits per dimension of the test images under the training subpixels' histogram."""
        if self._unigram is None:
            splits = self.images.splits
            self._unigram = unigram_bits(splits["train"].reshape(-1), splits["test"].reshape(-1), PIXEL_LEVELS)
        return {"unigram_bits_per_dim": self._unigram}

    def final_line(self, test: dict[str, float], best: float | None, tested: str) -> str:
        best_text = "none" if best is None else f"{best:.4f}"
        return (
            f"best val bits per dim {best_text}; bits per dim {test['bits_per_dim']:.4f} on test of the {tested} "
            f"weights (unigram baseline {self.baseline()['unigram_bits_per_dim']:.4f}; {test['count'] // self.dims:,} "
            "images)"
        )

    def state_dict(self) -> dict[str, int]:
        return {}  # the images come from (seed, step, micro-batch): nothing to save

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
