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

Under ``torchrun`` with several processes the same loop trains with DDP or FSDP2 (``train.parallel``), each
process on its share of every batch, rank 0 logging and writing (:mod:`hopformer.train.distributed`).

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
from hopformer.models.pretrained import WEIGHTS_NAME, read_weights
from hopformer.train import control, distributed
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
    rng_state,
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
RESUME_OVERRIDES = ("train.time_limit_minutes", "train.progress", "train.steps", "train.parallel")
STOP_CODES = (None, "time_limit", "SIGTERM", "SIGINT")  # ranks agree on the largest


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
    parallel = distributed.setup(config.train.parallel, config.train.device)  # a single process: no change
    try:
        if parallel.active:  # one run folder: rank 0's (a default one is named by the time)
            run_dir = Path(parallel.broadcast(str(run_dir)))
            config.train.run_dir = str(run_dir)
            log = log if parallel.main else _quiet
        deadline = control.run_deadline(started, config.train.time_limit_minutes, deadline)
        threads = torch.get_num_threads()
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        try:
            return _train(config, run_dir, resume is not None, log, deadline, started, parallel)
        finally:
            torch.set_num_threads(threads)  # a library call leaves the process as it found it
    finally:
        parallel.close()


def _quiet(*_: Any) -> None:
    """The log of ranks other than 0."""


def _train(
    config: Config,
    run_dir: Path,
    resuming: bool,
    log: Any,
    deadline: float | None,
    started: float,
    parallel: distributed.Parallel | None = None,
) -> TrainResult:
    """The body of :func:`train` once the run folder and config are settled."""
    tc = config.train
    parallel = parallel or distributed.Parallel()
    device = parallel.device(resolve_device(tc.device))
    check_device_support(config, device)
    seed_everything(tc.seed)  # on every rank: the same initial weights
    data = _load_data(config, log, parallel)
    model = build_model(config, data).to(device)
    if tc.init_from and not resuming:
        log(f"encoder weights from {load_encoder_weights(model, tc.init_from)}")
    raw, rows = model, distributed.rows(parallel, tc.batch_size // tc.grad_accum)
    if parallel.active:
        model = parallel.wrap(model)
        torch.manual_seed(tc.seed * 1_000_003 + parallel.rank)  # dropout: each rank its own masks
    optimizer = make_optimizer(model, config)
    runtime = Runtime.for_training(raw, config, device)
    feed = make_feed(data, config, runtime, rows=rows)
    # The run can start: only now is its folder made, so a run that fails to start leaves none behind.
    if parallel.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / CONFIG_NAME)
    parallel.barrier()
    budget = control.TimeBudget(deadline, control.margin_seconds(tc.time_limit_minutes, deadline, started))
    run = _Run(config, run_dir, feed, model, optimizer, runtime, budget, log, started, parallel=parallel, raw=raw)
    run.describe()
    if resuming:
        run.resume()
    else:
        run.metrics.truncate(0)  # a folder whose earlier attempt died before its first checkpoint
    run.open_progress_bar()

    model.train()
    with control.StopFlag() as stop:
        reason = run.agree("time_limit" if run.state.step < tc.steps and run.budget.expired() else None)
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
            reason = run.agree(stop.reason or (None if step == tc.steps or run.next_step_fits() else "time_limit"))
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


def _load_data(config: Config, log: Any, parallel: distributed.Parallel | None = None):
    """The task's examples (:class:`~hopformer.train.tasks.TaskData`), its corpus or its image set. In a
    distributed run rank 0 loads first (generating or downloading what it must), the others after it."""
    parallel = parallel or distributed.Parallel()
    if not parallel.main:
        parallel.barrier()
    if is_corpus_task(config.task):
        data = load_corpus_task(config, log)
    else:
        data = load_task(config, progress=config.train.progress and parallel.main, log=log)
        if config.data.data_dir is None:  # record the generated folder (in config.yaml), so resume and eval find it
            config.data.data_dir = str(data.source)
    if parallel.main:
        parallel.barrier()
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
    parallel: distributed.Parallel = field(default_factory=distributed.Parallel)
    raw: torch.nn.Module | None = None  # the model unwrapped (DDP's module); the model itself by default

    def __post_init__(self) -> None:
        self.raw = self.model if self.raw is None else self.raw
        self.metrics = MetricsLog(self.run_dir) if self.parallel.main else _NoMetrics()
        self.parameters = count_parameters(self.raw)
        self.eval_model = self.parallel.evaluation_model(self.model)

    def describe(self) -> None:
        if self.parallel.active:  # the first line of a distributed run: how it is spread
            tc = self.config.train
            share = tc.batch_size // tc.grad_accum // self.parallel.world
            self.log(
                f"{self.parallel.describe()}: global batch {tc.batch_size} in {tc.grad_accum} micro-batch(es), "
                f"{share} example(s) per process each"
            )
        self.log(self.feed.describe())
        self.log(
            f"model: {self.config.model.attention} attention, {self.parameters:,} parameters, on "
            f"{self.runtime.device}; run folder {self.run_dir}"
        )

    def open_progress_bar(self) -> None:
        from tqdm import tqdm

        tc = self.config.train
        self.bar = tqdm(
            total=tc.steps,
            initial=self.state.step,
            disable=not (tc.progress and self.parallel.main),
            dynamic_ncols=True,
            desc="train",
        )

    def resume(self) -> None:
        """Continue from ``last/``: weights, optimiser, data order, RNGs, and the metrics up to that step."""
        parallel = self.parallel if self.parallel.active else None  # None: the single-process path as it was
        self.state, found = resume_training(
            self.run_dir, self.model, self.optimizer, self.feed, self.config.train.steps, self.feed.metric, parallel
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
        accum = config.train.grad_accum
        for micro in range(accum):
            inputs, labels, tokens = self.feed.next_batch(state.step, micro)
            with self.parallel.gradient_sync(self.model, micro == accum - 1):  # DDP/FSDP: the last one syncs
                with runtime.context():
                    logits = self.model(**inputs).float()
                    loss, right, scored = objective_loss(logits, labels)
                    extra = aux_loss(self.model)
                    total = loss if extra is None else loss + extra
                (total / accum).backward()
            state.window.add(loss, right, scored, tokens)
        optimizer_step(self.model, self.optimizer, config.optim.grad_clip)
        state.step += 1
        state.window.steps += 1
        self.bar.update(1)
        return lr

    def log_training(self, lr: float) -> None:
        """Write the training record of the steps since the last one; a non-finite loss stops the run."""
        step, window = self.state.step, self.state.window
        if self.parallel.active:  # the window of the whole batch: every rank's sums added
            window.loss, window.correct, window.count, window.tokens = self._summed_window().values()
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
        val = self.feed.evaluate(self.eval_model, "val", self.config.train.eval_batches)
        self.budget.eval_seconds = control.clock() - began
        step, metric = self.state.step, self.feed.metric
        self.metrics.write({"step": step, "split": "val", **_scores(val)})
        if self.parallel.main:
            self.bar.write(f"step {step}: val loss {val['loss']:.4f}, val {metric.replace('_', ' ')} {val[metric]:.4f}")
        best = self.state.best
        if best is None or (val[metric] > best if self.feed.higher_is_better else val[metric] < best):
            self.state.best = val[metric]
            self.checkpoint("best")

    def checkpoint(self, name: str) -> None:
        """Save ``best/`` or ``last/``, timing it for the time budget."""
        began = control.clock()
        if self.parallel.active:
            self._checkpoint_distributed(name)
        else:
            save_training_checkpoint(
                self.run_dir / name, self.model, self.optimizer, self.feed, self.state, self.config, self.feed.metric
            )
        self.budget.checkpoint_seconds = max(self.budget.checkpoint_seconds, control.clock() - began)
        if name == "last":
            self.saved_at = self.state.step

    def _checkpoint_distributed(self, name: str) -> None:
        """Every rank gathers its part (weights, optimiser state, window sums, RNG state); rank 0 writes the
        checkpoint in the single-process format, atomically; the others wait until it is in place."""
        parallel = self.parallel
        weights = parallel.full_model_state(self.model)
        optimizer_state = parallel.full_optimizer_state(self.model, self.optimizer)
        window = self._summed_window()
        rngs = parallel.gather(rng_state())
        if parallel.main:
            save_training_checkpoint(
                self.run_dir / name,
                _GatheredModel(self.raw, weights),
                self.optimizer,
                self.feed,
                self.state,
                self.config,
                self.feed.metric,
                optimizer_state=optimizer_state,
                window_sums=window,
                rng_ranks=rngs,
            )
        parallel.barrier()

    def _summed_window(self) -> dict[str, float | int]:
        """The training window's sums over every rank."""
        sums = self.state.window.sums()
        loss, correct, count, tokens = self.parallel.sum([float(value) for value in sums.values()])
        return {"loss": loss, "correct": int(correct), "count": int(count), "tokens": int(tokens)}

    def agree(self, reason: str | None) -> str | None:
        """The stop reason every rank acts on (a single process: its own)."""
        if not self.parallel.active:
            return reason
        return STOP_CODES[self.parallel.agree(STOP_CODES.index(reason))]

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
            if self.parallel.active:
                device = next(self.model.parameters()).device
                self.parallel.load_model_state(self.model, read_weights(best_dir / WEIGHTS_NAME, device))
            else:
                load_weights(self.model, best_dir)
        tested = "best" if best_dir is not None else "final"  # final: no validation ran, or best/ was lost
        test = self.feed.evaluate(self.eval_model, "test")
        self.metrics.write({"step": self.state.step, "split": "test", **_scores(test)})
        self.metrics.close()
        extra = {"task": self.feed.task, "attention": self.config.model.attention, "test_checkpoint": tested}
        if self.feed.metric != "accuracy":  # a language or pixel model: its scores
            extra |= {
                f"test_{self.feed.metric}": test[self.feed.metric],
                f"best_val_{self.feed.metric}": self.state.best,
            }
        extra |= self.feed.baseline()  # every trivial baseline on test (ListOps: also the root-operator rule)
        if not self.parallel.main:  # rank 0 writes the results
            return self._result(test, extra=extra)
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


class _NoMetrics:
    """The metrics log of ranks other than 0: writes nothing."""

    def truncate(self, step: int) -> None:
        pass

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class _GatheredModel:
    """A model to save with weights gathered from every rank (FSDP2's shards)."""

    model: torch.nn.Module
    weights: dict[str, torch.Tensor]

    def save_pretrained(self, directory: Path) -> Path:
        return self.model.save_pretrained(directory, state_dict=self.weights)


def _scores(result: dict[str, float]) -> dict[str, float]:
    """An evaluation's scores as a metrics record holds them (not its count)."""
    return {key: value for key, value in result.items() if key != "count"}
