"""The training loop: :func:`train`, read top to bottom (nanoGPT style).

setup (device, seeds) -> data -> model + AdamW -> run folder -> resume -> loop -> best checkpoint on test.
The run folder is made only once data, model and optimiser are ready: a run that cannot start leaves none.

The loop, per optimiser step: set the learning rate, run ``grad_accum`` micro-batches (task loss +
every module's ``aux_loss``; bf16 autocast on CUDA), clip, step; log; every ``eval_every`` steps
validate, keep ``best/`` when the validation score improves, save ``last/``. The task loss is the
labels' cross-entropy, with ``train.objective="masked"`` the cross-entropy of hidden tokens
(self-pretraining; ``train.init_from`` starts a later run from that encoder), and with ``"causal"`` that
of every next byte. Batches and scores come from a feed (:mod:`hopformer.train.feeds`): a task's examples,
picked by accuracy, or a byte corpus, picked by bits per byte.

Resuming is exact: the data order is seeded and its position (if it has one) is saved with the optimiser
and every RNG state, so a run killed after a checkpoint and resumed with
``resume=`` gives the same ``metrics.jsonl`` and weights as one that never stopped. Ctrl-C (SIGINT) or
SIGTERM asks the loop to stop at the end of the current step; it saves ``last/`` there and returns (a
second signal stops at once). ``train.time_limit_minutes`` stops the same way, but by itself: after each
step the loop checks that the next one, with any evaluation and checkpoints it brings and a safety
margin, still ends before the limit, and otherwise saves ``last/`` and returns
(:mod:`hopformer.train.control`).

Run folder: ``config.yaml`` (resolved config), ``metrics.jsonl`` (one JSON record per log line),
``last/`` and ``best/`` checkpoints, ``results.json`` (final numbers), ``tensorboard/`` when
TensorBoard is installed. A folder moved with ``last/`` alone resumes with a warning; its test then
scores the final weights unless validation improves again, and ``results.json`` says which
(``extra.test_checkpoint``: ``best`` or ``final``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hopformer.models import aux_loss, count_parameters
from hopformer.train import control
from hopformer.train.batches import Runtime
from hopformer.train.build import (
    build_model,
    check_config,
    check_device_support,
    load_encoder_weights,
    resolve_device,
    seed_everything,
)
from hopformer.train.checkpoint import (
    TrainState,
    find_checkpoint,
    load_weights,
    resume_training,
    save_training_checkpoint,
)
from hopformer.train.config import CONFIG_NAME, Config, load_config, save_config, with_overrides
from hopformer.train.evaluation import objective_loss
from hopformer.train.feeds import Feed, make_feed
from hopformer.train.metrics import RESULTS_NAME, MetricsLog, training_cost
from hopformer.train.optim import learning_rate, make_optimizer, optimizer_step, set_learning_rate
from hopformer.train.tasks import is_corpus_task, load_corpus_task, load_task

# Settings a resumed run may change: they decide when and how it runs, not what it computes
# (``train.steps`` only under a schedule that does not depend on it; see :func:`train`).
RESUME_OVERRIDES = ("train.time_limit_minutes", "train.progress", "train.steps")


@dataclass
class TrainResult:
    """What :func:`train` returns (also written to ``results.json``)."""

    run_dir: str
    step: int
    best_val_accuracy: float | None
    test_accuracy: float | None
    test_loss: float | None
    majority_rate: float | None  # classification; a byte LM's baseline (unigram bits) is in ``extra``
    parameters: int
    interrupted: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    stop_reason: str | None = None  # "time_limit", "SIGINT" or "SIGTERM" when interrupted


def train(
    config: Config | None = None,
    resume: str | Path | None = None,
    log: Any = print,
    *,
    resume_overrides: dict[str, Any] | None = None,
    deadline: float | None = None,
) -> TrainResult:
    """Train a model on ``config.task``; with ``resume`` (a run folder) continue it from ``last/``.

    Args:
        config: the run's configuration (None = the packaged default); ignored when resuming (the run's
            ``config.yaml`` is used).
        resume: run folder of an earlier (killed, interrupted or time-limited) run.
        log: where progress lines go (``print``).
        resume_overrides: dotted settings a resumed run may change (:data:`RESUME_OVERRIDES`): its
            time limit, progress bars, and ``train.steps`` under the ``rsqrt`` or ``constant``
            schedule (whose learning rates do not depend on it), never below the step reached.
        deadline: a :data:`hopformer.train.control.clock` time by which to stop in any case (``hopformer
            lra`` gives every cell of a grid the same one); the earlier of it and
            ``train.time_limit_minutes`` applies.

    Returns:
        The final numbers (also in ``results.json``); ``interrupted=True`` (and ``stop_reason``) when the
        run stopped early at a time limit, a Ctrl-C or a SIGTERM, with ``last/`` saved.
    """
    started = control.clock()
    config, run_dir = _settle(config, resume, resume_overrides)
    check_config(config)
    deadline = control.run_deadline(started, config.train.time_limit_minutes, deadline)
    threads = torch.get_num_threads()
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    try:
        return _train(config, run_dir, resume is not None, log, deadline, started)
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def _train(
    config: Config, run_dir: Path, resuming: bool, log: Any, deadline: float | None, started: float
) -> TrainResult:
    """The body of :func:`train` once the run folder and config are settled."""
    tc = config.train
    device = resolve_device(tc.device)
    check_device_support(config, device)
    seed_everything(tc.seed)
    data = _load_data(config, log)
    model = build_model(config, data).to(device)
    if tc.init_from and not resuming:
        log(f"encoder weights from {load_encoder_weights(model, tc.init_from)}")
    optimizer = make_optimizer(model, config)
    runtime = Runtime.for_training(model, config, device)
    feed = make_feed(data, config, runtime)
    # The run can start: only now is its folder made, so a run that fails to start leaves none behind.
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / CONFIG_NAME)
    budget = control.TimeBudget(deadline, control.margin_seconds(tc.time_limit_minutes, deadline, started))
    run = _Run(config, run_dir, feed, model, optimizer, runtime, budget, log, started)
    run.describe()
    if resuming:
        run.resume()
    else:
        run.metrics.truncate(0)  # a folder whose earlier attempt died before its first checkpoint
    run.open_progress_bar()

    model.train()
    with control.StopFlag() as stop:
        reason = "time_limit" if run.state.step < tc.steps and run.budget.expired() else None
        while run.state.step < tc.steps and reason is None:
            began = control.clock()
            lr = run.train_step()
            step = run.state.step
            if step % tc.log_every == 0 or step == tc.steps:
                run.log_training(lr)
            run.budget.step_times.append(control.clock() - began)
            evaluates = step % tc.eval_every == 0 or step == tc.steps
            if evaluates:
                run.validate()  # and keeps best/ when validation improves
            if step % (tc.checkpoint_every or tc.eval_every) == 0 or step == tc.steps:
                run.checkpoint("last")
            if evaluates:
                run.state.window.restart_clock()  # tokens/s, steps/s: training time only
            reason = stop.reason or (None if step == tc.steps or run.next_step_fits() else "time_limit")
    run.bar.close()
    return run.stop(reason) if reason else run.test()


def _settle(config: Config | None, resume: str | Path | None, overrides: dict[str, Any] | None) -> tuple[Config, Path]:
    """The config and run folder: the run's own ``config.yaml`` when resuming, else ``config``'s."""
    if resume is None:
        if overrides:
            raise ValueError("resume_overrides apply only with resume=; put the settings in the config")
        config = config or load_config()
        run_dir = Path(config.train.run_dir) if config.train.run_dir else default_run_dir(config)
        if find_checkpoint(run_dir / "last") is not None:
            raise FileExistsError(f"{run_dir} already holds a run; pass --resume {run_dir} or another --run-dir")
        config.train.run_dir = str(run_dir)
        return config, run_dir
    run_dir = Path(resume)
    if not (run_dir / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"--resume {run_dir}: no {CONFIG_NAME} there; is it a run folder?")
    overrides = dict(overrides or {})
    refused = sorted(set(overrides) - set(RESUME_OVERRIDES))
    if refused:
        raise ValueError(f"a resumed run cannot change {refused}; it may change only {list(RESUME_OVERRIDES)}")
    saved = load_config(run_dir / CONFIG_NAME)
    config = with_overrides(saved, overrides, where=str(run_dir / CONFIG_NAME))
    if config.train.steps != saved.train.steps and config.optim.schedule not in ("rsqrt", "constant"):
        raise ValueError(
            f"train.steps cannot change on resume under the {config.optim.schedule!r} schedule (its learning "
            f"rates depend on it; only 'rsqrt' and 'constant' do not)"
        )
    return config, run_dir


def default_run_dir(config: Config) -> Path:
    """``runs/<task>-<attention>-<date>-<time>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.task}-{config.model.attention}-{stamp}"


def _load_data(config: Config, log: Any):
    """The task's examples (:class:`~hopformer.train.tasks.TaskData`), its corpus or its image set."""
    if is_corpus_task(config.task):
        return load_corpus_task(config, log)
    data = load_task(config, progress=config.train.progress, log=log)
    if config.data.data_dir is None:  # record the generated folder (in config.yaml), so resume and eval find it
        config.data.data_dir = str(data.source)
    return data


@dataclass
class _Run:
    """A run's pieces, and the parts of the loop that act on them."""

    config: Config
    run_dir: Path
    feed: Feed
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    runtime: Runtime
    budget: control.TimeBudget
    log: Any
    started: float
    state: TrainState = field(default_factory=TrainState)
    bar: Any = None
    saved_at: int | None = None  # the step of the newest last/ checkpoint

    def __post_init__(self) -> None:
        self.metrics = MetricsLog(self.run_dir)
        self.parameters = count_parameters(self.model)

    def describe(self) -> None:
        self.log(self.feed.describe())
        self.log(
            f"model: {self.config.model.attention} attention, {self.parameters:,} parameters, on "
            f"{self.runtime.device}; run folder {self.run_dir}"
        )

    def open_progress_bar(self) -> None:
        from tqdm import tqdm

        tc = self.config.train
        self.bar = tqdm(
            total=tc.steps, initial=self.state.step, disable=not tc.progress, dynamic_ncols=True, desc="train"
        )

    def resume(self) -> None:
        """Continue from ``last/``: weights, optimiser, data order, RNGs, and the metrics up to that step."""
        self.state, found = resume_training(
            self.run_dir, self.model, self.optimizer, self.feed, self.config.train.steps, self.feed.metric
        )
        self.metrics.truncate(self.state.step)
        self.log(f"resumed from {found} at step {self.state.step}")
        if self.state.best is not None and find_checkpoint(self.run_dir / "best") is None:
            self.log(
                f"warning: {self.run_dir} records a best validation {self.feed.metric} of {self.state.best:.4f} but "
                "holds no best/ checkpoint (copied without it?); unless validation beats it, the test scores the "
                "final weights instead"
            )

    def train_step(self) -> float:
        """One optimiser step over ``train.grad_accum`` micro-batches; returns its learning rate."""
        config, state, runtime = self.config, self.state, self.runtime
        lr = set_learning_rate(self.optimizer, learning_rate(state.step, config))
        for micro in range(config.train.grad_accum):
            inputs, labels, tokens = self.feed.next_batch(state.step, micro)
            with runtime.context():
                logits = self.model(**inputs).float()
                loss, right, scored = objective_loss(logits, labels)
                extra = aux_loss(self.model)
                total = loss if extra is None else loss + extra
            (total / config.train.grad_accum).backward()
            state.window.add(loss, right, scored, tokens)
        optimizer_step(self.model, self.optimizer, config.optim.grad_clip)
        state.step += 1
        state.window.steps += 1
        self.bar.update(1)
        return lr

    def log_training(self, lr: float) -> None:
        """Write the training record of the steps since the last one; a non-finite loss stops the run."""
        step, window = self.state.step, self.state.window
        record = window.record(step, lr)
        if self.runtime.device.type == "cuda":  # since the process started: training and evaluation
            record["peak_memory_mib"] = torch.cuda.max_memory_allocated(self.runtime.device) / 2**20
        self.metrics.write(record)
        if not math.isfinite(record["loss"]):  # stop before a NaN model is validated or saved
            raise FloatingPointError(
                f"the training loss became {record['loss']} between steps {step - window.steps} and {step} (lr "
                f"{lr:.3g}); lower optim.lr or set optim.grad_clip (e.g. 1.0). Checkpoints in {self.run_dir} hold "
                "the last finite model"
            )
        self.bar.set_postfix(
            loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}"
        )
        window.reset()

    def validate(self) -> None:
        """Score the validation split; save ``best/`` when the feed's score beats the best so far."""
        began = control.clock()
        val = self.feed.evaluate(self.model, "val", self.config.train.eval_batches)
        self.budget.eval_seconds = control.clock() - began
        step, metric = self.state.step, self.feed.metric
        self.metrics.write({"step": step, "split": "val", **_scores(val)})
        self.bar.write(f"step {step}: val loss {val['loss']:.4f}, val {metric.replace('_', ' ')} {val[metric]:.4f}")
        best = self.state.best
        if best is None or (val[metric] > best if self.feed.higher_is_better else val[metric] < best):
            self.state.best = val[metric]
            self.checkpoint("best")

    def checkpoint(self, name: str) -> None:
        """Save ``best/`` or ``last/``, timing it for the time budget."""
        began = control.clock()
        save_training_checkpoint(
            self.run_dir / name, self.model, self.optimizer, self.feed, self.state, self.config, self.feed.metric
        )
        self.budget.checkpoint_seconds = max(self.budget.checkpoint_seconds, control.clock() - began)
        if name == "last":
            self.saved_at = self.state.step

    def next_step_fits(self) -> bool:
        """Whether the next step, with the evaluation and checkpoints it brings, ends before the deadline."""
        tc, following = self.config.train, self.state.step + 1
        val_batches = self.feed.eval_batches("val", tc.eval_batches)
        return self.budget.next_step_fits(
            evaluates=following % tc.eval_every == 0 or following == tc.steps,
            saves=following % (tc.checkpoint_every or tc.eval_every) == 0,
            last=following == tc.steps,
            eval_examples=val_batches * tc.batch_size,
            test_ratio=self.feed.eval_batches("test") / max(1, val_batches),
            batch_size=tc.batch_size,
        )

    def stop(self, reason: str) -> TrainResult:
        """End early (time limit or signal): ``last/`` saved at this step, a line on how to resume."""
        if self.saved_at != self.state.step:
            self.checkpoint("last")
        self.metrics.close()
        step, steps = self.state.step, self.config.train.steps
        if reason == "time_limit":
            used = (control.clock() - self.started) / 60
            self.log(
                f"step {step}/{steps} after {used:.1f} min: stopped at time limit, resume with --resume {self.run_dir}"
            )
        else:
            self.log(f"{reason} at step {step}/{steps}; checkpoint saved, resume with --resume {self.run_dir}")
        extra = {"task": self.feed.task, "attention": self.config.model.attention, "steps": steps}
        return self._result(None, interrupted=True, stop_reason=reason, extra=extra)

    def test(self) -> TrainResult:
        """The best validation checkpoint (else the final weights) on the test split (LRA convention)."""
        best_dir = find_checkpoint(self.run_dir / "best")
        if best_dir is not None:
            load_weights(self.model, best_dir)
        tested = "best" if best_dir is not None else "final"  # final: no validation ran, or best/ was lost
        test = self.feed.evaluate(self.model, "test")
        self.metrics.write({"step": self.state.step, "split": "test", **_scores(test)})
        self.metrics.close()
        extra = {"task": self.feed.task, "attention": self.config.model.attention, "test_checkpoint": tested}
        if self.feed.metric != "accuracy":  # a language or pixel model: its scores
            extra |= {
                f"test_{self.feed.metric}": test[self.feed.metric],
                f"best_val_{self.feed.metric}": self.state.best,
            }
        extra |= self.feed.baseline()  # every trivial baseline on test (ListOps: also the root-operator rule)
        result = self._result(test, extra={**extra, **training_cost(self.run_dir)})
        (self.run_dir / RESULTS_NAME).write_text(json.dumps(result.__dict__, indent=2) + "\n")
        self.log(f"{self.feed.final_line(test, self.state.best, tested)}; run folder {self.run_dir}")
        return result

    def _result(self, test: dict[str, float] | None, **kwargs: Any) -> TrainResult:
        accuracy, loss = (None, None) if test is None else (test["accuracy"], test["loss"])
        by_accuracy = self.feed.metric == "accuracy"
        return TrainResult(
            str(self.run_dir),
            self.state.step,
            self.state.best if by_accuracy else None,
            accuracy,
            loss,
            self.feed.baseline().get("majority_rate"),
            self.parameters,
            **kwargs,
        )


def _scores(result: dict[str, float]) -> dict[str, float]:
    """An evaluation's scores as a metrics record holds them (not its count)."""
    return {key: value for key, value in result.items() if key != "count"}
