"""The training loop: one function, :func:`train`, read top to bottom (nanoGPT style).

setup (device, seeds, run folder) -> data -> model + AdamW -> resume -> loop -> best checkpoint on test.

The loop, per optimiser step: set the learning rate, run ``grad_accum`` micro-batches (task loss +
every module's ``aux_loss``; bf16 autocast on CUDA), clip, step; log; every ``eval_every`` steps
validate, keep ``best/`` when validation accuracy improves, save ``last/``. The task loss is the
labels' cross-entropy, or with ``train.objective="masked"`` the cross-entropy of hidden tokens
(self-pretraining; ``train.init_from`` starts a later run from that encoder).

Resuming is exact: the data order is a seeded :class:`BatchStream` whose position is saved with the
optimiser and every RNG state, so a run killed after a checkpoint and resumed with ``resume=`` gives
the same ``metrics.jsonl`` and weights as one that never stopped. Ctrl-C (SIGINT) or SIGTERM asks the
loop to stop at the end of the current step; it saves ``last/`` there and returns (a second signal
stops at once). ``train.time_limit_minutes`` stops the same way, but by itself: after each step the
loop checks that the next one, with any evaluation and checkpoints it brings and a safety margin,
still ends before the limit, and otherwise saves ``last/`` and returns.

Run folder: ``config.yaml`` (resolved config), ``metrics.jsonl`` (one JSON record per log line),
``last/`` and ``best/`` checkpoints, ``results.json`` (final numbers), ``tensorboard/`` when
TensorBoard is installed. A folder moved with ``last/`` alone resumes with a warning; its test then
scores the final weights unless validation improves again, and ``results.json`` says which
(``extra.test_checkpoint``: ``best`` or ``final``).
"""

from __future__ import annotations

import json
import math
import random
import signal
import statistics
import threading
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hopformer.data.batching import collate, dihedral
from hopformer.models import (
    DualEncoderClassifier,
    IntensityEmbedding,
    MaskedTokenModel,
    SequenceClassifier,
    TransformerEncoder,
    aux_loss,
    count_parameters,
)
from hopformer.train import checkpoint as ckpt
from hopformer.train.config import Config, load_config, save_config
from hopformer.train.tasks import TaskData, load_task

SCHEDULES = ("linear", "cosine", "constant", "rsqrt")
OBJECTIVES = ("classify", "masked")
METRICS_NAME = "metrics.jsonl"
RESULTS_NAME = "results.json"
CONFIG_NAME = "config.yaml"
# Attentions that run on a graph: FlexAttention on CUDA (head dimension >= 16, no attention dropout).
GRAPH_ATTENTIONS = ("local", "longformer", "bigbird", "hypercube", "diffuser")
# Settings a resumed run may change: they decide when and how it runs, not what it computes
# (``train.steps`` only under a schedule that does not depend on it; see :func:`train`).
RESUME_OVERRIDES = ("train.time_limit_minutes", "train.progress", "train.steps")
TIME_LIMIT_MARGIN_S = 30.0
"""Safety margin of a time limit: ``min(30 s, 10% of the limit)`` is kept free at the end."""

_now = time.monotonic  # the clock of time limits (tests replace it)


# ----------------------------------------------------------------------------------- data order
class BatchStream:
    """An endless, seeded sequence of batches of example indices; ``(epoch, position)`` is its state.

    Each epoch is a permutation drawn from ``seed + epoch``. With ``bucket``, the permutation is cut
    into pools of 50 batches, each pool sorted by length and cut into batches, and the batches shuffled
    again: batches hold similar lengths (little padding) but their order stays random.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, bucket: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not lengths:
            raise ValueError("BatchStream needs at least one example")
        self.lengths = torch.as_tensor(lengths)
        self.batch_size = min(batch_size, len(lengths))
        self.seed, self.bucket = seed, bucket
        self.epoch, self.position = 0, 0
        self._batches: list[list[int]] | None = None

    def _epoch_batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator)
        size = self.batch_size
        whole = len(order) - len(order) % size  # drop the ragged tail: every step sees a full batch
        if not self.bucket:
            return order[:whole].view(-1, size).tolist()
        batches = []
        pool = 50 * size
        for start in range(0, whole, pool):
            chunk = order[start : min(start + pool, whole)]
            chunk = chunk[torch.argsort(self.lengths[chunk], stable=True)]
            batches.extend(chunk.view(-1, size).tolist())
        shuffle = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in shuffle]

    def next(self) -> list[int]:
        """Indices of the next batch."""
        if self._batches is None:
            self._batches = self._epoch_batches()
        if self.position >= len(self._batches):
            self.epoch, self.position = self.epoch + 1, 0
            self._batches = self._epoch_batches()
        batch = self._batches[self.position]
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._batches = None


def _augmented(examples: list[dict], stream: BatchStream, config: Config) -> list[dict]:
    """The stream's next batch, each image under a seeded random symmetry when ``data.augment`` asks.

    The symmetries are drawn from (seed, epoch, position), the stream's saved state, so a resumed run
    sees the same images as an uninterrupted one.
    """
    indices = stream.next()
    if config.data.augment == "none":
        return [examples[i] for i in indices]
    epoch, position = stream.epoch, stream.position - 1  # of the batch next() just returned
    key = (config.train.seed * 1_000_003 + epoch) * 1_000_003 + position
    generator = torch.Generator().manual_seed(key % (1 << 63))
    codes = torch.randint(8, (len(indices),), generator=generator).tolist()
    return [dihedral(examples[i], code) for i, code in zip(indices, codes, strict=True)]


# --------------------------------------------------------------------------------------- schedule
def learning_rate(step: int, config: Config) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warmup, then the configured decay."""
    optim, total = config.optim, config.train.steps
    peak, floor = optim.lr, optim.lr * optim.min_lr_ratio
    warmup = optim.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    if optim.schedule == "constant":
        return peak
    if optim.schedule == "rsqrt":
        return max(floor, peak * math.sqrt(max(warmup, 1) / (step + 1)))
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if optim.schedule == "linear":
        return floor + (peak - floor) * (1.0 - progress)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


# ------------------------------------------------------------------------------------- the model
def build_model(config: Config, data: TaskData, pad_to_multiple: int) -> torch.nn.Module:
    """The classifier of ``config.model`` for ``data`` (vocabulary and labels from the task)."""
    m = config.model
    if config.train.objective == "masked" and data.spec.pair:
        raise ValueError(f"train.objective='masked' reads one sequence per example; {data.spec.name!r} has pairs")
    cls_extra = 1 if m.pooling == "cls" else 0
    max_len = m.max_len or -(-data.longest() // 128) * 128 + cls_extra
    vocab = max(data.spec.vocab_size, 1 + max(int(e["input_ids"].max()) for e in data.splits["train"]))
    if config.train.objective == "masked":
        vocab += 1  # the mask token, after every id the task uses (a classifier drops its row: init_from)
    encoder = TransformerEncoder(
        vocab_size=vocab,
        dim=m.dim,
        depth=m.depth,
        heads=m.heads,
        mlp_dim=m.mlp_dim,
        max_len=max_len,
        attention=m.attention,
        attention_options=m.attention_options,
        norm=m.norm,
        positions=m.positions,
        dropout=m.dropout,
        attention_dropout=m.attention_dropout,
        pad_id=None if data.spec.pixels else 0,
        pad_to_multiple=pad_to_multiple,
        gradient_checkpointing=m.gradient_checkpointing,
        init=m.init,
        embedding=m.embedding,
        stem_depth=m.stem_depth,
    )
    if config.train.objective == "masked":
        return MaskedTokenModel(encoder, vocab)
    head = DualEncoderClassifier if data.spec.pair else SequenceClassifier
    return head(encoder, data.spec.num_classes, pooling=m.pooling, head_dim=m.head_dim)


def load_encoder_weights(model: torch.nn.Module, source: str | Path) -> Path:
    """Copy the encoder of a run (its ``best/``, else ``last/`` checkpoint) or of a checkpoint folder
    into ``model.encoder``; returns the checkpoint folder read."""
    from safetensors.torch import load_file

    from hopformer.models.transformer import WEIGHTS_NAME

    source = Path(source).expanduser()
    found = ckpt.find_checkpoint(source / "best") or ckpt.find_checkpoint(source / "last")
    if found is None and (source / WEIGHTS_NAME).is_file():
        found = source
    if found is None:
        raise FileNotFoundError(
            f"train.init_from={source}: no checkpoint there (a run folder with best/ or last/, or a checkpoint "
            f"folder with {WEIGHTS_NAME})"
        )
    device = next(model.parameters()).device
    weights = load_file(str(found / WEIGHTS_NAME), device=str(device))
    encoder = {name.removeprefix("encoder."): t for name, t in weights.items() if name.startswith("encoder.")}
    # A masked-token model has one more id, its mask token: a last table row, or a pixel embedding's special row.
    embed = model.encoder.embed
    if isinstance(embed, torch.nn.Embedding) and len(encoder.get("embed.weight", ())) == embed.num_embeddings + 1:
        encoder["embed.weight"] = encoder["embed.weight"][: embed.num_embeddings]
    elif isinstance(embed, IntensityEmbedding) and embed.special is None:
        encoder.pop("embed.special.weight", None)
    try:
        model.encoder.load_state_dict(encoder)
    except RuntimeError as error:
        raise ValueError(f"train.init_from={source}: its encoder does not fit this model: {error}") from error
    return found


def objective_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean cross-entropy, number correct and number scored, for ``(N, classes)`` logits: one row per
    sequence, or per hidden token (masked objective; a batch may hide none)."""
    loss = F.cross_entropy(logits, labels) if len(labels) else logits.sum() * 0.0
    return loss, (logits.argmax(-1) == labels).sum(), len(labels)


def make_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.AdamW:
    """AdamW; weight decay on weight matrices only (not biases, LayerNorm gains, the CLS vector, nor
    Diffuser's learned hop logits or weights, which decay would pull towards equal or zero weights).
    With ``optim.hop_lr_scale != 1`` the hop weights form a third group whose ``lr_scale`` the loop
    multiplies into the scheduled rate (only then, so checkpoints of two groups still resume)."""
    hop_names = ("hop_logits", "hop_weights")
    separate = config.optim.hop_lr_scale != 1.0
    decay, other, hop = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_hop = name.endswith(hop_names)
        if is_hop and separate:
            hop.append(p)
        elif p.dim() >= 2 and not is_hop:
            decay.append(p)
        else:
            other.append(p)
    groups = [{"params": decay, "weight_decay": config.optim.weight_decay}, {"params": other, "weight_decay": 0.0}]
    if hop:
        groups.append({"params": hop, "weight_decay": 0.0, "lr_scale": config.optim.hop_lr_scale})
    return torch.optim.AdamW(groups, lr=config.optim.lr, betas=tuple(config.optim.betas), eps=config.optim.eps)


def max_tokens(model: torch.nn.Module) -> int:
    """Longest input the model takes (the encoder's ``max_len`` less the CLS vector)."""
    return model.encoder.config.max_len - prefix_length(model)


def masking(model: torch.nn.Module, config: Config) -> dict[str, float | int]:
    """:class:`Runtime` settings of the masked objective for a :class:`MaskedTokenModel` (its mask is the
    last row of the embedding table, see :func:`build_model`); none for a classifier."""
    if not isinstance(model, MaskedTokenModel):
        return {}
    return {"mask_rate": config.train.mask_rate, "mask_id": model.config.vocab_size - 1}


def prefix_length(model: torch.nn.Module) -> int:
    """Positions the classifier puts before the tokens: 1 for the CLS vector, else 0."""
    return 1 if getattr(model, "pooling", None) == "cls" else 0


# ------------------------------------------------------------------------------------- evaluation
@dataclass
class Runtime:
    """Where and how batches run: device, autocast, padding multiple, length cut.

    ``prefix``: positions the model puts before the tokens (1 for a CLS vector). Batches are padded so
    that prefix + tokens is a multiple of ``pad_to_multiple`` (within ``max_length``): the encoder then
    adds no padding of its own, and a graph attention sees whole tiles, not one CLS position more.
    """

    device: torch.device
    autocast: bool
    pad_to_multiple: int
    max_length: int
    prefix: int = 0
    mask_rate: float = 0.0  # > 0: masked-token objective
    mask_id: int = 0

    def batch(self, examples: list[dict], mask_seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
        """Collate and move to the device; returns (model inputs, labels, number of real tokens).

        With ``mask_rate``, each real token is hidden (replaced by ``mask_id``) with that probability,
        drawn from ``mask_seed``; the inputs then carry ``select`` (where tokens are hidden) and the
        labels are the hidden tokens' ids, in row-major order.
        """
        batch = collate(examples, max_length=self.max_length)
        for ids_key, mask_key in (("input_ids", "attention_mask"), ("input_ids_2", "attention_mask_2")):
            if ids_key in batch:
                width = batch[ids_key].shape[1]
                multiple = self.pad_to_multiple
                target = min(-(-(width + self.prefix) // multiple) * multiple - self.prefix, self.max_length)
                if target > width:
                    batch[ids_key] = F.pad(batch[ids_key], (0, target - width))
                    batch[mask_key] = F.pad(batch[mask_key], (0, target - width), value=False)
        tokens = sum(int(mask.sum()) for key, mask in batch.items() if key.startswith("attention_mask"))
        if self.mask_rate > 0:
            ids = batch["input_ids"]
            draws = torch.rand(ids.shape, generator=torch.Generator().manual_seed(mask_seed))
            hidden = (draws < self.mask_rate) & batch["attention_mask"]
            batch["label"], batch["select"] = ids[hidden], hidden
            batch["input_ids"] = torch.where(hidden, self.mask_id, ids)
        batch = {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}
        return batch, batch.pop("label"), tokens

    def context(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast else nullcontext()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, examples: list[dict], runtime: Runtime, batch_size: int, max_batches: int | None = None
) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` on ``examples`` (sorted by length into batches: less padding)."""
    if max_batches is not None:
        examples = examples[: max_batches * batch_size]
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for start in range(0, len(order), batch_size):
        inputs, labels, _ = runtime.batch([examples[i] for i in order[start : start + batch_size]], mask_seed=start)
        with runtime.context():
            logits = model(**inputs).float()
        loss, right, scored = objective_loss(logits, labels)
        loss_sum += loss.item() * scored
        correct += right.item()
        count += scored
    model.train(was_training)
    return {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1), "count": count}


# ----------------------------------------------------------------------------------------- logging
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
        records = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
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
        return math.inf if self.deadline is None else self.deadline - _now()

    def expired(self) -> bool:
        """Too late to start anything but the stop checkpoint."""
        return self.remaining() < self.checkpoint_seconds + self.margin

    def next_step_fits(self, evaluates: bool, saves: bool, last: bool, eval_examples: int, test_ratio: float,
                       batch_size: int) -> bool:  # fmt: skip
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


# ----------------------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    """What :func:`train` returns (also written to ``results.json``)."""

    run_dir: str
    step: int
    best_val_accuracy: float | None
    test_accuracy: float | None
    test_loss: float | None
    majority_rate: float
    parameters: int
    interrupted: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    stop_reason: str | None = None  # "time_limit", "SIGINT" or "SIGTERM" when interrupted


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available")
    return torch.device(name)


def default_run_dir(config: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.task}-{config.model.attention}-{stamp}"


def train(
    config: Config | None = None,
    resume: str | Path | None = None,
    log: Any = print,
    *,
    resume_overrides: dict[str, Any] | None = None,
    deadline: float | None = None,
) -> TrainResult:
    """Train a classifier on ``config.task``; with ``resume`` (a run folder) continue it from ``last/``.

    Args:
        config: the run's configuration; ignored when resuming (the run's ``config.yaml`` is used).
        resume: run folder of an earlier (killed, interrupted or time-limited) run.
        log: where progress lines go (``print``).
        resume_overrides: dotted settings a resumed run may change (:data:`RESUME_OVERRIDES`): its
            time limit, progress bars, and ``train.steps`` under the ``rsqrt`` or ``constant``
            schedule (whose learning rates do not depend on it), never below the step reached.
        deadline: a :func:`time.monotonic` time by which to stop in any case (``hopformer lra`` gives
            every cell of a grid the same one); the earlier of it and ``train.time_limit_minutes``
            applies.

    Returns:
        The final numbers (also in ``results.json``); ``interrupted=True`` (and ``stop_reason``) when the
        run stopped early at a time limit, a Ctrl-C or a SIGTERM, with ``last/`` saved.
    """
    started = _now()
    # ---- setup: config, run folder, device, seeds
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"--resume {run_dir}: no {CONFIG_NAME} there; is it a run folder?")
        overrides = dict(resume_overrides or {})
        refused = sorted(set(overrides) - set(RESUME_OVERRIDES))
        if refused:
            raise ValueError(f"a resumed run cannot change {refused}; it may change only {list(RESUME_OVERRIDES)}")
        saved = load_config(run_dir / CONFIG_NAME)
        config = load_config(run_dir / CONFIG_NAME, overrides)
        if config.train.steps != saved.train.steps and config.optim.schedule not in ("rsqrt", "constant"):
            raise ValueError(
                f"train.steps cannot change on resume under the {config.optim.schedule!r} schedule (its learning "
                f"rates depend on it; only 'rsqrt' and 'constant' do not)"
            )
    else:
        if resume_overrides:
            raise ValueError("resume_overrides apply only with resume=; put the settings in the config")
        config = config or load_config()
        run_dir = Path(config.train.run_dir) if config.train.run_dir else default_run_dir(config)
        if ckpt.find_checkpoint(run_dir / "last") is not None:
            raise FileExistsError(f"{run_dir} already holds a run; pass --resume {run_dir} or another --run-dir")
        config.train.run_dir = str(run_dir)
    _check_config(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / CONFIG_NAME)
    limit = config.train.time_limit_minutes
    if limit is not None:
        deadline = min(deadline if deadline is not None else math.inf, started + 60.0 * limit)
    threads = torch.get_num_threads()
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    try:
        return _run(config, run_dir, resume is not None, log, deadline, started)
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def _run(config: Config, run_dir: Path, resume: bool, log: Any, deadline: float | None, started: float) -> TrainResult:
    """The body of :func:`train` once the run folder and config are settled."""
    tc = config.train
    device = resolve_device(tc.device)
    _check_device_support(config, device)
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    autocast = tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")

    # ---- data
    data = load_task(config, progress=tc.progress, log=log)
    if config.data.data_dir is None:  # record the generated folder, so resume and eval find the same data
        config.data.data_dir = str(data.source)
        save_config(config, run_dir / CONFIG_NAME)
    pad = config.data.pad_to_multiple or (1 if config.model.attention == "full" else 128)
    train_set, val_set = data.splits["train"], data.splits["val"]
    micro_batch = tc.batch_size // tc.grad_accum
    stream = BatchStream([len(e["input_ids"]) for e in train_set], micro_batch, tc.seed, config.data.bucket)
    eval_batch = tc.eval_batch_size or tc.batch_size

    # ---- model and optimiser
    model = build_model(config, data, pad).to(device)
    if tc.init_from and not resume:
        log(f"encoder weights from {load_encoder_weights(model, tc.init_from)}")
    optimizer = make_optimizer(model, config)
    runtime = Runtime(device, autocast, pad, max_tokens(model), prefix_length(model), **masking(model, config))
    parameters = count_parameters(model)
    majority = data.majority_rate("test")
    log(
        f"{config.task}: {len(train_set)}/{len(val_set)}/{len(data.splits['test'])} examples from {data.source}; "
        f"majority-class rate (test) {majority:.1%}"
    )
    log(f"model: {config.model.attention} attention, {parameters:,} parameters, on {device}; run folder {run_dir}")

    # ---- resume
    metrics = MetricsLog(run_dir)
    step, best = 0, None
    # Running sums since the last log line; loss and correct stay on the device (no sync per step).
    # They are part of the checkpoint, so a run stopped between two log lines logs the same numbers.
    window: dict[str, Any] = {"loss": 0.0, "correct": 0, "count": 0, "tokens": 0}
    if resume:
        found = ckpt.find_checkpoint(run_dir / "last")
        if found is None:
            raise FileNotFoundError(f"--resume {run_dir}: no checkpoint in {run_dir / 'last'}")
        state = ckpt.load_state(found)
        if int(state["step"]) > tc.steps:
            raise ValueError(f"train.steps={tc.steps} is below the step {int(state['step'])} this run has reached")
        ckpt.load_weights(model, found)
        optimizer.load_state_dict(state["optimizer"])
        stream.load_state_dict(state["data"])
        ckpt.set_rng_state(state["rng"])
        step, best = int(state["step"]), state["best_val_accuracy"]
        window.update(state.get("window", {}))
        metrics.truncate(step)
        log(f"resumed from {found} at step {step}")
        if best is not None and ckpt.find_checkpoint(run_dir / "best") is None:
            log(
                f"warning: {run_dir} records a best validation accuracy of {best:.4f} but holds no best/ checkpoint "
                "(copied without it?); unless validation beats it, the test scores the final weights instead"
            )
    else:
        metrics.truncate(0)  # a folder whose earlier attempt died before its first checkpoint
    window.update(start=time.perf_counter(), steps=0)  # timing (steps/s): not part of the checkpoint

    budget = TimeBudget(deadline, _margin(tc.time_limit_minutes, deadline, started))
    saved_at: int | None = None  # the step of the newest last/ checkpoint

    def checkpoint(name: str) -> None:
        nonlocal saved_at
        began = _now()
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "data": stream.state_dict(),
            "rng": ckpt.rng_state(),
            "best_val_accuracy": best,
            "schedule": {"name": config.optim.schedule, "lr": learning_rate(step, config)},
            "window": {
                "loss": float(window["loss"]),
                "correct": int(window["correct"]),
                "count": int(window["count"]),
                "tokens": int(window["tokens"]),
            },
        }
        ckpt.save_checkpoint(run_dir / name, model, state)
        budget.checkpoint_seconds = max(budget.checkpoint_seconds, _now() - began)
        if name == "last":
            saved_at = step

    # ---- the loop
    from tqdm import tqdm

    bar = tqdm(total=tc.steps, initial=step, disable=not tc.progress, dynamic_ncols=True, desc="train")
    stop_reason = None
    eval_examples = min(len(val_set), tc.eval_batches * eval_batch) if tc.eval_batches else len(val_set)
    test_ratio = len(data.splits["test"]) / max(1, eval_examples)
    model.train()
    with StopFlag() as stop:
        if step < tc.steps and budget.expired():
            stop_reason = "time_limit"
        while step < tc.steps and stop_reason is None:
            step_began = _now()
            lr = learning_rate(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            for micro in range(tc.grad_accum):
                # hidden tokens (masked objective) are drawn from (seed, step, micro-batch): resume is exact
                mask_seed = (tc.seed * 1_000_003 + step) * tc.grad_accum + micro
                inputs, labels, tokens = runtime.batch(_augmented(train_set, stream, config), mask_seed)
                with runtime.context():
                    logits = model(**inputs).float()
                    loss, right, scored = objective_loss(logits, labels)
                    extra = aux_loss(model)
                    total = loss if extra is None else loss + extra
                (total / tc.grad_accum).backward()
                window["loss"] += loss.detach() * scored
                window["correct"] += right
                window["count"] += scored
                window["tokens"] += tokens
            if config.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window["steps"] += 1
            bar.update(1)

            if step % tc.log_every == 0 or step == tc.steps:
                elapsed = time.perf_counter() - window["start"]
                record = {
                    "step": step,
                    "split": "train",
                    "loss": float(window["loss"]) / window["count"],
                    "accuracy": int(window["correct"]) / window["count"],
                    "lr": lr,
                    "tokens_per_s": window["tokens"] / max(elapsed, 1e-9),
                    "steps_per_s": window["steps"] / max(elapsed, 1e-9),
                }
                if runtime.device.type == "cuda":  # since the process started: training and evaluation
                    record["peak_memory_mib"] = torch.cuda.max_memory_allocated(runtime.device) / 2**20
                metrics.write(record)
                if not math.isfinite(record["loss"]):  # stop before a NaN model is validated or saved
                    raise FloatingPointError(
                        f"the training loss became {record['loss']} between steps {step - window['steps']} and "
                        f"{step} (lr {lr:.3g}); lower optim.lr or set optim.grad_clip (e.g. 1.0). Checkpoints "
                        f"in {run_dir} hold the last finite model"
                    )
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}"
                )
                window.update(loss=0.0, correct=0, count=0, tokens=0, steps=0, start=time.perf_counter())
            budget.step_times.append(_now() - step_began)

            if step % tc.eval_every == 0 or step == tc.steps:
                eval_began = _now()
                val = evaluate(model, val_set, runtime, eval_batch, tc.eval_batches)
                budget.eval_seconds = _now() - eval_began
                metrics.write({"step": step, "split": "val", "loss": val["loss"], "accuracy": val["accuracy"]})
                bar.write(f"step {step}: val loss {val['loss']:.4f}, val accuracy {val['accuracy']:.4f}")
                if best is None or val["accuracy"] > best:
                    best = val["accuracy"]
                    checkpoint("best")
            if step % (tc.checkpoint_every or tc.eval_every) == 0 or step == tc.steps:
                checkpoint("last")
            if step % tc.eval_every == 0 or step == tc.steps:
                window.update(start=time.perf_counter(), steps=0)  # tokens/s, steps/s: training time only
            if stop.requested:
                stop_reason = stop.signal_name or "SIGINT"
            elif step < tc.steps:
                following = step + 1
                fits = budget.next_step_fits(
                    evaluates=following % tc.eval_every == 0 or following == tc.steps,
                    saves=following % (tc.checkpoint_every or tc.eval_every) == 0,
                    last=following == tc.steps,
                    eval_examples=eval_examples,
                    test_ratio=test_ratio,
                    batch_size=tc.batch_size,
                )
                if not fits:
                    stop_reason = "time_limit"
    bar.close()

    if stop_reason is not None:
        if saved_at != step:
            checkpoint("last")
        metrics.close()
        if stop_reason == "time_limit":
            used = (_now() - started) / 60
            log(f"step {step}/{tc.steps} after {used:.1f} min: stopped at time limit, resume with --resume {run_dir}")
        else:
            log(f"{stop_reason} at step {step}/{tc.steps}; checkpoint saved, resume with --resume {run_dir}")
        return TrainResult(
            str(run_dir), step, best, None, None, majority, parameters, interrupted=True, stop_reason=stop_reason,
            extra={"task": data.spec.name, "attention": config.model.attention, "steps": tc.steps},
        )  # fmt: skip

    # ---- the best validation checkpoint, on test (LRA convention)
    best_dir = ckpt.find_checkpoint(run_dir / "best")
    if best_dir is not None:
        ckpt.load_weights(model, best_dir)
    tested = "best" if best_dir is not None else "final"  # final: no validation ran, or best/ was lost
    test = evaluate(model, data.splits["test"], runtime, eval_batch)
    metrics.write({"step": step, "split": "test", "loss": test["loss"], "accuracy": test["accuracy"]})
    metrics.close()
    result = TrainResult(
        str(run_dir), step, best, test["accuracy"], test["loss"], majority, parameters,
        extra={"task": data.spec.name, "attention": config.model.attention, "test_checkpoint": tested,
               **training_cost(run_dir)},
    )  # fmt: skip
    (run_dir / RESULTS_NAME).write_text(json.dumps(result.__dict__, indent=2) + "\n")
    baseline = "over hidden tokens" if tc.objective == "masked" else f"majority class {majority:.4f}"
    log(
        f"best val accuracy {best:.4f}; test accuracy {test['accuracy']:.4f} of the {tested} weights ({baseline}); "
        f"run folder {run_dir}"
    )
    return result


def training_cost(run_dir: Path) -> dict[str, float]:
    """Median training steps/s and the largest CUDA peak memory (MiB) logged in ``metrics.jsonl``
    (all segments of a resumed run); what is not logged is left out."""
    records = [json.loads(line) for line in (run_dir / METRICS_NAME).read_text().splitlines() if line.strip()]
    train_records = [r for r in records if r.get("split") == "train"]
    cost = {}
    speeds = [r["steps_per_s"] for r in train_records if "steps_per_s" in r]
    if speeds:
        cost["steps_per_s"] = statistics.median(speeds)
    peaks = [r["peak_memory_mib"] for r in train_records if "peak_memory_mib" in r]
    if peaks:
        cost["peak_memory_mib"] = max(peaks)
    return cost


def _margin(limit_minutes: float | None, deadline: float | None, started: float) -> float:
    """Seconds kept free before the deadline: ``min(30 s, 10% of the time allowed)``."""
    if deadline is None:
        return 0.0
    allowed = 60.0 * limit_minutes if limit_minutes is not None else deadline - started
    return min(TIME_LIMIT_MARGIN_S, 0.1 * max(allowed, 0.0))


def _check_device_support(config: Config, device: torch.device) -> None:
    """What FlexAttention (graph attentions on CUDA) cannot do, named before any data is loaded."""
    m = config.model
    backend = m.attention_options.get("backend", "auto")
    if device.type != "cuda" or m.attention not in GRAPH_ATTENTIONS or backend not in ("auto", "flex"):
        return
    head_dim = m.dim // m.heads
    if head_dim < 16:
        raise ValueError(
            f"model.dim / model.heads = {m.dim} / {m.heads} = {head_dim}: FlexAttention, which runs the graph "
            f"attention {m.attention!r} on CUDA, needs a head dimension of at least 16; use model.heads <= "
            f"{max(1, m.dim // 16)} or model.attention_options.backend=gather"
        )
    if m.attention_dropout > 0:
        raise ValueError(
            f"model.attention_dropout={m.attention_dropout}: FlexAttention, which runs the graph attention "
            f"{m.attention!r} on CUDA, has no attention dropout; set it to 0 or model.attention_options.backend=gather"
        )


def _check_config(config: Config) -> None:
    """Errors that name the setting, before any data is loaded."""
    tc, oc = config.train, config.optim
    for name in ("steps", "batch_size", "grad_accum", "eval_every", "log_every"):
        value = getattr(tc, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"train.{name} must be a positive integer, got {value!r}")
    if tc.batch_size % tc.grad_accum:
        raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by train.grad_accum={tc.grad_accum}")
    if tc.precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"train.precision must be auto, bf16 or fp32, got {tc.precision!r}")
    if tc.objective not in OBJECTIVES:
        raise ValueError(f"train.objective={tc.objective!r} is not known; choose one of {list(OBJECTIVES)}")
    if tc.objective == "masked" and not 0 < tc.mask_rate < 1:
        raise ValueError(f"train.mask_rate must be in (0, 1) for the masked objective, got {tc.mask_rate!r}")
    if oc.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={oc.schedule!r} is not known; choose one of {list(SCHEDULES)}")
    if oc.lr <= 0:
        raise ValueError(f"optim.lr must be positive, got {oc.lr!r}")
    scale = oc.hop_lr_scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"optim.hop_lr_scale must be a positive number, got {scale!r}")
    if oc.warmup_steps < 0:
        raise ValueError(f"optim.warmup_steps must be >= 0, got {oc.warmup_steps!r}")
    limit = tc.time_limit_minutes
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0):
        raise ValueError(f"train.time_limit_minutes must be a positive number of minutes or null, got {limit!r}")
    from hopformer.attention import available, build

    m = config.model
    if m.attention not in available():
        raise ValueError(f"model.attention={m.attention!r} is not known; choose one of {available()}")
    if not isinstance(m.attention_options, dict):
        raise TypeError(f"model.attention_options must be a mapping, got {m.attention_options!r}")
    build(m.attention, m.dim, m.heads, **m.attention_options)  # a bad option fails here, before the data loads
