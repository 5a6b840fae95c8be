"""Trainer: learning, schedule, data order, checkpoints (atomic), exact resume, config, tasks."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hopformer.train import (
    BatchStream,
    batches,
    build,
    control,
    evaluation,
    feeds,
    learning_rate,
    metrics,
    optim,
    train,
)
from hopformer.train import checkpoint as checkpoint_module
from hopformer.train.checkpoint import find_checkpoint, load_state, rng_state, save_checkpoint, set_rng_state
from hopformer.train.config import Config, from_dict, load_config, parse_assignment
from hopformer.train.tasks import find_listops_dir, listops_cache_dir, load_task

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")


def write_trivial_listops(folder: Path, seed: int = 0, sizes=(96, 32, 32)) -> Path:
    """A trivial task in the ListOps TSV format: the label is the first argument of the root."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in zip(("train", "val", "test"), sizes):
        lines = ["Source\tTarget"]
        for _ in range(count):
            args = [rng.randrange(10) for _ in range(rng.randrange(2, 12))]
            lines.append(f"( {rng.choice(OPERATORS)} {' '.join(map(str, args))} ] )\t{args[0]}")
        (folder / f"basic_{split}.tsv").write_text("\n".join(lines) + "\n")
    return folder


def tiny_config(tmp_path: Path, run: str = "run", **train) -> Config:
    values = {
        "task": "listops",
        "data": {"data_dir": str(tmp_path / "data")},
        "model": {"dim": 32, "depth": 1, "heads": 2, "mlp_dim": 64, "dropout": 0.1},
        "optim": {"lr": 3e-3, "warmup_steps": 5},
        "train": {"steps": 8, "batch_size": 16, "eval_every": 2, "log_every": 1, "progress": False,
                  "device": "cpu", "threads": 1, "run_dir": str(tmp_path / run), **train},
    }  # fmt: skip
    return from_dict(values)


@pytest.fixture
def data(tmp_path):
    return write_trivial_listops(tmp_path / "data")


def strip_timing(path: Path) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "steps_per_s")} for r in records]


def signal_after(step: int, split: str, signum: int):
    """A ``MetricsLog.write`` that sends this process ``signum`` once it has written that record."""
    real_write = metrics.MetricsLog.write

    def write(self, record):
        real_write(self, record)
        if record["step"] == step and record["split"] == split:
            os.kill(os.getpid(), signum)

    return write


def test_a_tiny_run_learns_a_trivial_task(tmp_path, data):
    config = tiny_config(tmp_path, steps=120, eval_every=60, log_every=20, grad_accum=2)
    result = train(config, log=lambda *_: None)
    records = strip_timing(tmp_path / "run" / "metrics.jsonl")
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert losses[-1] < 0.8 * losses[0]
    assert result.best_val_accuracy > 0.3 and result.test_accuracy > 0.3  # chance is 0.1
    assert records[-1]["split"] == "test"
    folder = tmp_path / "run"
    assert {"config.yaml", "metrics.jsonl", "results.json", "last", "best"} <= {p.name for p in folder.iterdir()}
    assert load_config(folder / "config.yaml") == load_config(folder / "config.yaml")  # readable back
    saved = json.loads((folder / "results.json").read_text())
    assert saved["test_accuracy"] == result.test_accuracy
    assert saved["extra"]["steps_per_s"] > 0  # training cost (peak memory only on CUDA)


def test_resume_after_interrupt_and_crash_matches_an_uninterrupted_run(tmp_path, data, monkeypatch):
    quiet = lambda *_: None  # noqa: E731
    reference = train(tiny_config(tmp_path, "reference"), log=quiet)

    # 1) Ctrl-C (a real SIGINT) during step 3: the loop finishes the step, checkpoints and returns.
    real_write = metrics.MetricsLog.write
    monkeypatch.setattr(metrics.MetricsLog, "write", signal_after(3, "train", signal.SIGINT))
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN under nohup
    first = train(tiny_config(tmp_path, "resumed"), log=quiet)
    assert first.interrupted and first.step == 3
    assert load_state(tmp_path / "resumed" / "last")["step"] == 3
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler restored

    # 2) A crash (an exception, no checkpoint) after step 5 was logged: last/ still holds step 4.
    def crash_after_step_5(self, record):
        real_write(self, record)
        if record["step"] == 5 and record["split"] == "train":
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(metrics.MetricsLog, "write", crash_after_step_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(resume=tmp_path / "resumed", log=quiet)
    assert load_state(tmp_path / "resumed" / "last")["step"] == 4

    # 3) Resume to the end: the same metrics (step 5 is logged again, once) and the same weights.
    monkeypatch.setattr(metrics.MetricsLog, "write", real_write)
    final = train(resume=tmp_path / "resumed", log=quiet)
    resumed_metrics = strip_timing(tmp_path / "resumed" / "metrics.jsonl")
    assert resumed_metrics == strip_timing(tmp_path / "reference" / "metrics.jsonl")
    assert final.test_accuracy == reference.test_accuracy
    for name in ("last", "best"):
        a = load_file(str(tmp_path / "reference" / name / "model.safetensors"))
        b = load_file(str(tmp_path / "resumed" / name / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class FakeClock:
    """``control.clock``: every reading advances the time by ``tick`` seconds."""

    def __init__(self, tick: float = 1.0) -> None:
        self.time, self.tick = 1000.0, tick

    def __call__(self) -> float:
        self.time += self.tick
        return self.time


def test_time_limit_stops_cleanly_and_resume_continues_exactly(tmp_path, data, monkeypatch):
    quiet = lambda *_: None  # noqa: E731
    settings = {"steps": 20, "eval_every": 4, "log_every": 5}
    reference = train(tiny_config(tmp_path, "reference", **settings), log=quiet)

    lines = []
    monkeypatch.setattr(control, "clock", FakeClock())
    first = train(tiny_config(tmp_path, "limited", time_limit_minutes=0.5, **settings), log=lines.append)
    assert first.interrupted and first.stop_reason == "time_limit" and first.test_accuracy is None
    assert 0 < first.step < 20 and first.step % 5  # stopped between two log lines: the running sums are saved
    assert load_state(tmp_path / "limited" / "last")["step"] == first.step
    assert not (tmp_path / "limited" / "results.json").exists()
    assert any(f"stopped at time limit, resume with --resume {tmp_path / 'limited'}" in line for line in lines)

    # a second slice of time: the saved limit applies again, counted from the resume
    monkeypatch.setattr(control, "clock", FakeClock())
    second = train(resume=tmp_path / "limited", log=quiet)
    assert second.stop_reason == "time_limit" and first.step < second.step < 20

    # then without a limit to the end: the same metrics and weights as the run that never stopped
    monkeypatch.setattr(control, "clock", FakeClock(tick=0.0))
    final = train(resume=tmp_path / "limited", log=quiet, resume_overrides={"train.time_limit_minutes": None})
    assert not final.interrupted and final.step == 20
    assert strip_timing(tmp_path / "limited" / "metrics.jsonl") == strip_timing(
        tmp_path / "reference" / "metrics.jsonl"
    )
    assert final.test_accuracy == reference.test_accuracy
    for name in ("last", "best"):
        a = load_file(str(tmp_path / "reference" / name / "model.safetensors"))
        b = load_file(str(tmp_path / "limited" / name / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("validation_improves", [True, False])
def test_a_run_resumed_without_its_best_checkpoint_says_which_weights_it_tested(
    tmp_path, data, monkeypatch, validation_improves
):
    """A run folder copied without best/ (only last/ travelled) warns on resume, and results.json names the
    weights its test scored: a new best/ if validation beat the recorded best after the resume, else the final."""
    quiet = lambda *_: None  # noqa: E731
    settings = {"steps": 20, "eval_every": 2, "log_every": 5}
    reference = train(tiny_config(tmp_path, "reference", **settings), log=quiet)
    assert reference.extra["test_checkpoint"] == "best"

    monkeypatch.setattr(control, "clock", FakeClock())
    first = train(tiny_config(tmp_path, "copied", time_limit_minutes=0.5, **settings), log=quiet)
    assert first.interrupted and 2 <= first.step < 20
    best_before = load_state(tmp_path / "copied" / "last")["best_val_accuracy"]
    shutil.rmtree(tmp_path / "copied" / "best")

    if not validation_improves:  # every validation after the resume scores 0; the test (the last call) is real
        validations_left = sum(1 for s in range(first.step + 1, 21) if s % 2 == 0)
        real_evaluate, calls = feeds.evaluate, []  # the example feed's evaluation

        def evaluate(*args, **kwargs):
            calls.append(1)
            result = real_evaluate(*args, **kwargs)
            return {**result, "accuracy": 0.0} if len(calls) <= validations_left else result

        monkeypatch.setattr(feeds, "evaluate", evaluate)

    lines = []
    monkeypatch.setattr(control, "clock", FakeClock(tick=0.0))
    final = train(resume=tmp_path / "copied", log=lines.append, resume_overrides={"train.time_limit_minutes": None})
    assert any("holds no best/ checkpoint" in line for line in lines)
    records = [json.loads(line) for line in (tmp_path / "copied" / "metrics.jsonl").read_text().splitlines()]
    improved = any(r["split"] == "val" and r["step"] > first.step and r["accuracy"] > best_before for r in records)
    assert improved == validation_improves  # the trivial task keeps improving unless validation is stubbed out
    assert final.extra["test_checkpoint"] == ("best" if improved else "final")
    assert (tmp_path / "copied" / "best").exists() == improved
    saved = json.loads((tmp_path / "copied" / "results.json").read_text())
    assert saved["extra"]["test_checkpoint"] == final.extra["test_checkpoint"]
    if not improved:  # the final weights were tested: the uninterrupted run's last/
        expected = load_file(str(tmp_path / "reference" / "last" / "model.safetensors"))
        ours = load_file(str(tmp_path / "copied" / "last" / "model.safetensors"))
        assert all(torch.equal(expected[k], ours[k]) for k in expected)


def test_a_time_limit_already_spent_saves_step_zero(tmp_path, data, monkeypatch):
    monkeypatch.setattr(control, "clock", FakeClock(tick=40.0))  # data loading "takes" 40 s
    result = train(tiny_config(tmp_path, "late", time_limit_minutes=0.5), log=lambda *_: None)
    assert result.stop_reason == "time_limit" and result.step == 0
    assert load_state(tmp_path / "late" / "last")["step"] == 0
    monkeypatch.setattr(control, "clock", FakeClock(tick=0.0))
    finished = train(resume=tmp_path / "late", log=lambda *_: None)
    reference = train(tiny_config(tmp_path, "reference"), log=lambda *_: None)
    assert finished.test_accuracy == reference.test_accuracy
    assert strip_timing(tmp_path / "late" / "metrics.jsonl") == strip_timing(tmp_path / "reference" / "metrics.jsonl")


def test_sigterm_checkpoints_and_resume_matches(tmp_path, data, monkeypatch):
    quiet = lambda *_: None  # noqa: E731
    reference = train(tiny_config(tmp_path, "reference", log_every=3), log=quiet)
    real_write = metrics.MetricsLog.write
    monkeypatch.setattr(metrics.MetricsLog, "write", signal_after(4, "val", signal.SIGTERM))
    previous = signal.getsignal(signal.SIGTERM)
    first = train(tiny_config(tmp_path, "terminated", log_every=3), log=quiet)
    assert first.interrupted and first.stop_reason == "SIGTERM" and first.step == 4
    assert load_state(tmp_path / "terminated" / "last")["step"] == 4
    assert signal.getsignal(signal.SIGTERM) == previous  # handler restored
    monkeypatch.setattr(metrics.MetricsLog, "write", real_write)
    final = train(resume=tmp_path / "terminated", log=quiet)
    assert final.test_accuracy == reference.test_accuracy
    assert strip_timing(tmp_path / "terminated" / "metrics.jsonl") == strip_timing(
        tmp_path / "reference" / "metrics.jsonl"
    )


def test_resume_may_change_only_how_a_run_runs(tmp_path, data):
    quiet = lambda *_: None  # noqa: E731
    train(tiny_config(tmp_path, steps=4), log=quiet)
    with pytest.raises(ValueError, match="cannot change.*model.dim"):
        train(resume=tmp_path / "run", log=quiet, resume_overrides={"model.dim": 64})
    with pytest.raises(ValueError, match="train.steps cannot change on resume under the 'linear' schedule"):
        train(resume=tmp_path / "run", log=quiet, resume_overrides={"train.steps": 6})
    with pytest.raises(ValueError, match="time_limit_minutes"):
        train(tiny_config(tmp_path, "other", time_limit_minutes=0), log=quiet)


def test_rsqrt_runs_may_extend_their_budget_on_resume(tmp_path, data):
    quiet = lambda *_: None  # noqa: E731
    config = tiny_config(tmp_path, steps=4)
    config.optim.schedule = "rsqrt"
    train(config, log=quiet)
    longer = train(resume=tmp_path / "run", log=quiet, resume_overrides={"train.steps": 6})
    assert longer.step == 6 and load_config(tmp_path / "run" / "config.yaml").train.steps == 6
    with pytest.raises(ValueError, match="below the step 6"):
        train(resume=tmp_path / "run", log=quiet, resume_overrides={"train.steps": 5})


def test_attentions_no_backend_runs_on_the_device_fail_before_the_data_loads(monkeypatch):
    """The trainer asks the backend dispatch (no GPU needed: it reasons about a CUDA device)."""
    import hopformer.ops.triton_diffusion as triton_module

    monkeypatch.setattr(triton_module, "available", lambda: False)  # the same answer with or without Triton here
    config = from_dict({"model": {"attention": "bigbird", "dim": 32, "heads": 4}})
    with pytest.raises(ValueError, match=r"model.attention='bigbird', head dim 8 .*needs head_dim >= 16, got 8"):
        build.check_device_support(config, torch.device("cuda"))
    build.check_device_support(config, torch.device("cpu"))  # the gather backend has no such limit
    config = from_dict({"model": {"attention": "bigbird", "dim": 64, "heads": 2, "attention_dropout": 0.1}})
    with pytest.raises(ValueError, match="attention dropout 0.1 cannot run on cuda.*no attention dropout"):
        build.check_device_support(config, torch.device("cuda"))
    config.model.attention = "full"
    build.check_device_support(config, torch.device("cuda"))
    # narrow heads do diffuse on CUDA: the matrix backend takes them up to 2,048 tokens
    config = from_dict({"model": {"attention": "diffuser", "dim": 32, "heads": 4}, "data": {"max_length": 2000}})
    build.check_device_support(config, torch.device("cuda"))


def test_the_trainer_fills_what_the_task_decides_in_the_model_config(tmp_path, data):
    """``model.vocab_size``, ``max_len``, ``pad_id`` and ``pad_to_multiple``: None = from the task, as before
    they were settings; a value given is used, and a vocabulary too small for the task is refused by name."""
    config = tiny_config(tmp_path)
    config.head.pooling = "cls"
    task = load_task(config, progress=False)
    resolved = build.model_config(config, task)
    assert (resolved.vocab_size, resolved.max_len, resolved.pad_id, resolved.pad_to_multiple) == (16, 129, 0, 1)
    assert config.model.vocab_size is None  # the run's config keeps "from the task"
    config.model.attention, config.model.attention_options = "local", {"block_size": 16}
    assert build.model_config(config, task).pad_to_multiple == 128  # graph attentions: FlexAttention tiles
    config.data.pad_to_multiple = 64
    assert build.model_config(config, task).pad_to_multiple == 64
    config.model.pad_to_multiple, config.model.max_len, config.model.vocab_size = 32, 300, 40
    resolved = build.model_config(config, task)
    assert (resolved.vocab_size, resolved.max_len, resolved.pad_to_multiple) == (40, 300, 32)
    config.train.objective, config.model.vocab_size = "masked", None
    assert build.model_config(config, task).vocab_size == 17  # the mask id after the task's ids
    config.model.vocab_size = 16
    with pytest.raises(ValueError, match="model.vocab_size=16 is below the 17 ids of task 'listops' and the mask"):
        build.model_config(config, task)
    config.model.pad_id = -1
    with pytest.raises(ValueError, match="model.pad_id must be a non-negative integer or null"):
        build.check_config(config)


def test_batches_with_a_cls_vector_fill_whole_tiles():
    runtime = batches.Runtime(torch.device("cpu"), False, pad_to_multiple=128, max_length=2048, prefix=1)
    examples = [{"input_ids": torch.ones(n, dtype=torch.long), "label": 0} for n in (100, 300)]
    inputs, labels, tokens = runtime.batch(examples)
    assert inputs["input_ids"].shape == (2, 383) and tokens == 400  # 383 tokens + CLS = 3 tiles
    assert inputs["attention_mask"].sum(1).tolist() == [100, 300]
    capped = batches.Runtime(torch.device("cpu"), False, pad_to_multiple=128, max_length=300, prefix=1)
    assert capped.batch(examples)[0]["input_ids"].shape == (2, 300)  # never past what the model takes


def test_a_new_run_refuses_a_folder_that_holds_a_run(tmp_path, data):
    train(tiny_config(tmp_path, steps=2), log=lambda *_: None)
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_config(tmp_path, steps=2), log=lambda *_: None)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.arange(6.0).view(2, 3))

    def save_pretrained(self, folder):
        from safetensors.torch import save_file

        Path(folder).mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.weight.detach().clone()}, str(Path(folder) / "model.safetensors"))


def test_checkpoints_are_atomic(tmp_path, monkeypatch):
    model = Tiny()
    target = tmp_path / "last"
    save_checkpoint(target, model, {"step": 1})
    save_checkpoint(target, model, {"step": 2})  # replaces the first
    assert load_state(target)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no temp or old folders left

    # A failure while writing the state leaves the previous checkpoint whole, and no temp files.
    def failing_save(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(target, model, {"step": 3})
    monkeypatch.undo()
    assert load_state(target)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert not [p for p in target.iterdir() if p.name.endswith(".tmp")]

    # A crash between the two renames leaves only the retired copy: it is still found.
    os.replace(target, tmp_path / ".last.old")
    assert find_checkpoint(target) == tmp_path / ".last.old"


def test_state_file_loads_with_weights_only_and_restores_rng(tmp_path):
    random.seed(1)
    torch.manual_seed(1)
    import numpy as np

    np.random.seed(1)
    state = rng_state()
    expected = (random.random(), float(np.random.rand()), torch.rand(1).item())
    save_checkpoint(tmp_path / "last", Tiny(), {"rng": state, "step": 0})
    for _ in range(3):
        random.random(), np.random.rand(), torch.rand(1)
    set_rng_state(load_state(tmp_path / "last")["rng"])  # load_state uses weights_only=True
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == expected


def test_batch_stream_is_seeded_and_resumable():
    rng = random.Random(0)
    lengths = [rng.randrange(5, 100) for _ in range(100)]
    a = BatchStream(lengths, 8, seed=3)
    first_epoch = [a.next() for _ in range(12)]  # 100 // 8 = 12 full batches
    assert sorted(i for b in first_epoch for i in b) == sorted(set(i for b in first_epoch for i in b))
    assert len({i for b in first_epoch for i in b}) == 96
    b = BatchStream(lengths, 8, seed=3)
    assert [b.next() for _ in range(12)] == first_epoch
    state = a.state_dict()
    upcoming = [a.next() for _ in range(5)]  # crosses into epoch 2
    c = BatchStream(lengths, 8, seed=3)
    c.load_state_dict(state)
    assert [c.next() for _ in range(5)] == upcoming
    assert BatchStream(lengths, 8, seed=4).next() != first_epoch[0]
    # Bucketing: batches hold similar lengths, so there is less padding than with plain shuffling.
    plain = BatchStream(lengths, 8, seed=3, bucket=False)

    def spread(stream: BatchStream) -> int:
        batches = [stream.next() for _ in range(12)]
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)

    assert spread(BatchStream(lengths, 8, seed=3)) < spread(plain) / 2


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant", "rsqrt"])
def test_learning_rate_schedule(schedule):
    config = from_dict({"optim": {"lr": 1.0, "warmup_steps": 10, "schedule": schedule, "min_lr_ratio": 0.1},
                        "train": {"steps": 110}})  # fmt: skip
    rates = [learning_rate(step, config) for step in range(110)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)  # linear warmup
    assert all(a <= b + 1e-12 for a, b in zip(rates[:10], rates[1:10]))
    if schedule == "constant":
        assert rates[-1] == 1.0
    elif schedule == "rsqrt":
        assert rates[39] == pytest.approx((10 / 40) ** 0.5)
    else:
        assert all(a >= b - 1e-12 for a, b in zip(rates[10:], rates[11:]))  # decays
        assert rates[-1] == pytest.approx(0.1, abs=0.02)  # to min_lr_ratio * lr


def test_config_file_overrides_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {dim: 48, heads: 4}\noptim: {betas: [0.9, 0.95]}\n")
    config = load_config(path, {"model.attention": "diffuser", "model.attention_options.hops": 3})
    assert (config.model.dim, config.model.heads, config.optim.betas) == (48, 4, (0.9, 0.95))
    assert config.model.attention_options == {"hops": 3} and config.train.steps == Config().train.steps
    assert parse_assignment("alpha=0.2") == ("alpha", 0.2)
    assert parse_assignment("causal=true") == ("causal", True)
    with pytest.raises(ValueError, match="dimm"):
        load_config(path, {"model.dimm": 3})
    with pytest.raises(ValueError, match="model.dim"):
        load_config(path, {"model.dim": "wide"})
    # YAML 1.1 reads 1e-3 (no dot) as a string; a number field takes it, a word is still refused
    assert load_config(path, {"optim.lr": parse_assignment("lr=1e-3")[1]}).optim.lr == 1e-3
    with pytest.raises(ValueError, match="optim.lr must be a number, got 'fast'"):
        load_config(path, {"optim.lr": "fast"})
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="schedule"):
        train(from_dict({"optim": {"schedule": "step"}}), log=lambda *_: None)


def test_listops_is_generated_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HOPFORMER_CACHE", str(tmp_path / "cache"))
    config = from_dict({"data": {"generate": {"train": 12, "val": 4, "test": 4, "min_length": 3, "max_length": 30}}})
    folder = listops_cache_dir(config)
    assert folder.parent == tmp_path / "cache" and folder.name.startswith("listops-")
    data = load_task(config, progress=False, log=lambda *_: None)
    assert [len(data.splits[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    assert find_listops_dir(folder) == folder and data.source == folder
    stamp = (folder / "basic_train.tsv").stat().st_mtime_ns
    load_task(config, progress=False, log=lambda *_: None)
    assert (folder / "basic_train.tsv").stat().st_mtime_ns == stamp  # not generated again
    other = from_dict({"data": {"generate": {"train": 13}}})
    assert listops_cache_dir(other) != folder  # other settings, other folder


def test_lra_tasks_need_a_data_dir(tmp_path):
    with pytest.raises(ValueError, match="--data-dir"):
        load_task(from_dict({"task": "lra-text"}))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_task(from_dict({"task": "image", "data": {"data_dir": str(tmp_path / "nowhere")}}))
    with pytest.raises(ValueError, match="task"):
        load_task(from_dict({"task": "sudoku"}))


def test_pixel_data_options_mask_black_pixels_and_pathfinder_difficulty(tmp_path):
    """Off: every pixel is a real token. On (the LRA reference's ``inputs > 0``): black pixels are masked."""
    from hopformer.data.pathfinder import generate_pathfinder

    generate_pathfinder(tmp_path, n=20, workers=1, progress=False)
    settings = {"task": "pathfinder32", "data": {"data_dir": str(tmp_path)}}
    plain = load_task(from_dict(settings), progress=False)
    settings["data"]["mask_black_pixels"] = True
    masked = load_task(from_dict(settings), progress=False)
    for split in ("train", "val", "test"):
        for a, b in zip(plain.splits[split], masked.splits[split], strict=True):
            assert torch.equal(a["input_ids"], b["input_ids"]) and a["label"] == b["label"]
            assert bool(a["attention_mask"].all())
            assert torch.equal(b["attention_mask"], a["input_ids"] != 0)
            assert 0 < int(b["attention_mask"].sum()) < len(b["attention_mask"])
    settings["data"]["pathfinder_difficulty"] = "curv_baseline"  # a folder that was not generated
    with pytest.raises(FileNotFoundError, match="curv_baseline"):
        load_task(from_dict(settings), progress=False)
    generate_pathfinder(tmp_path, difficulty="curv_baseline", n=10, workers=1, progress=False)
    easy = load_task(from_dict(settings), progress=False)
    assert sum(len(easy.splits[split]) for split in ("train", "val", "test")) == 10
    settings["data"]["pathfinder_difficulty"] = "curv_contour_length_99"
    with pytest.raises(ValueError, match="difficulty must be one of"):
        load_task(from_dict(settings), progress=False)
    with pytest.raises(ValueError, match="mask_black_pixels.*pixel tasks.*'listops'"):
        load_task(from_dict({"data": {"mask_black_pixels": True}}))
    with pytest.raises(ValueError, match="mask_black_pixels"):
        from_dict({"data": {"mask_black_pixels": "yes"}})


def test_dihedral_gives_the_eight_symmetries_of_the_square():
    from hopformer.data.batching import dihedral

    side = 5
    ids = torch.arange(side * side)  # each pixel's value is its position: every symmetry differs
    mask = torch.rand(side * side) < 0.5
    example = {"input_ids": ids, "attention_mask": mask, "label": 1}
    seen = set()
    for code in range(8):
        out = dihedral(example, code)
        expected = np.rot90(ids.view(side, side).numpy(), code % 4)
        expected = np.fliplr(expected) if code >= 4 else expected
        assert out["input_ids"].tolist() == expected.reshape(-1).tolist()
        # the mask moves with its pixels (value = source position); the label is untouched
        assert out["attention_mask"].tolist() == [bool(mask[i]) for i in out["input_ids"].tolist()]
        assert out["label"] == 1
        seen.add(tuple(out["input_ids"].tolist()))
    assert len(seen) == 8 and dihedral(example, 0)["input_ids"].tolist() == ids.tolist()
    with pytest.raises(ValueError, match="code must be an int in 0..7"):
        dihedral(example, 8)
    with pytest.raises(ValueError, match="square image, got 24 pixels"):
        dihedral({"input_ids": torch.arange(24)}, 1)


@pytest.mark.slow
def test_dihedral_augmentation_trains_and_resumes_exactly(tmp_path, monkeypatch):
    """Training batches are transformed, seeded by the stream's state: a resumed run matches an unbroken one."""
    from hopformer.data.pathfinder import generate_pathfinder

    generate_pathfinder(tmp_path / "pf", n=40, workers=1, progress=False)
    quiet = lambda *_: None  # noqa: E731

    def config(run: str, augment: str = "dihedral", **train_settings) -> Config:
        settings = {
            "task": "pathfinder32",
            "data": {"data_dir": str(tmp_path / "pf"), "augment": augment},
            "model": {"dim": 16, "depth": 1, "heads": 2, "mlp_dim": 16},
            "train": {"steps": 10, "batch_size": 8, "eval_every": 5, "log_every": 1, "progress": False,
                      "device": "cpu", "threads": 1, "run_dir": str(tmp_path / run), **train_settings},
        }  # fmt: skip
        return from_dict(settings)

    reference = train(config("reference"), log=quiet)
    plain = train(config("plain", augment="none"), log=quiet)
    assert strip_timing(tmp_path / "reference" / "metrics.jsonl") != strip_timing(tmp_path / "plain" / "metrics.jsonl")
    monkeypatch.setattr(metrics.MetricsLog, "write", signal_after(6, "train", signal.SIGINT))
    first = train(config("resumed"), log=quiet)
    assert first.interrupted and first.step == 6
    monkeypatch.undo()
    final = train(resume=tmp_path / "resumed", log=quiet)
    assert final.step == reference.step == plain.step == 10
    resumed = strip_timing(tmp_path / "resumed" / "metrics.jsonl")
    assert resumed == strip_timing(tmp_path / "reference" / "metrics.jsonl")
    with pytest.raises(ValueError, match="augment='dihedral' applies to Pathfinder.*'listops'"):
        load_task(from_dict({"data": {"augment": "dihedral"}}))
    with pytest.raises(ValueError, match="data.augment='flip' is not known"):
        load_task(from_dict({"data": {"augment": "flip"}}))


def test_a_nan_loss_stops_the_run_before_it_is_saved(tmp_path, data, monkeypatch):
    """A diverged run raises, naming the steps and the remedy, instead of training on NaN."""
    real = evaluation.F.cross_entropy
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(evaluation.F, "cross_entropy", poisoned)
    with pytest.raises(FloatingPointError, match="between steps 2 and 3.*grad_clip"):
        train(tiny_config(tmp_path, steps=8, eval_every=4, log_every=1), log=lambda *_: None)
    assert not (tmp_path / "run" / "results.json").exists()


def test_masked_tokens_are_real_tokens_drawn_from_the_seed():
    from hopformer.models import EncoderConfig, MaskedTokenModel, TransformerEncoder
    from hopformer.train.batches import Runtime

    examples = [{"input_ids": torch.arange(1, n + 1), "label": 0} for n in (300, 180)]
    runtime = Runtime(torch.device("cpu"), False, 1, 512, mask_rate=0.25, mask_id=99, mask_policy="mask")
    inputs, labels, tokens = runtime.batch(examples, mask_seed=7)
    real, ids = inputs["attention_mask"], torch.stack([torch.arange(1, 301), torch.arange(1, 301)])
    hidden = inputs["select"]
    assert tokens == 480 and not (hidden & ~real).any()  # padding is never hidden
    assert 0.18 < hidden.sum().item() / 480 < 0.32
    assert torch.equal(labels, ids[hidden]) and (inputs["input_ids"][hidden] == 99).all()
    assert (inputs["input_ids"][real & ~hidden] == ids[real & ~hidden]).all()
    same = runtime.batch(examples, mask_seed=7)[0]["select"]
    different = runtime.batch(examples, mask_seed=8)[0]["select"]
    assert torch.equal(same, hidden) and not torch.equal(different, hidden)
    # the model scores the selected positions only: the same logits as the whole table's rows there
    model = MaskedTokenModel(
        TransformerEncoder(EncoderConfig(301, dim=16, depth=1, heads=2, mlp_dim=16, max_len=512)), 301
    ).eval()
    every = model(inputs["input_ids"], inputs["attention_mask"])
    torch.testing.assert_close(model(**inputs), every[hidden])


def test_masked_pretraining_learns_resumes_and_starts_a_classifier(tmp_path, data, monkeypatch, capsys):
    """Self-pretraining: hidden tokens are learned, resume is exact, a classifier starts from the encoder."""
    from safetensors.torch import load_file as load_weights_file

    from hopformer.cli import main as cli_main
    from hopformer.models import EncoderConfig, SequenceClassifier, TransformerEncoder
    from hopformer.train.build import load_encoder_weights

    quiet = lambda *_: None  # noqa: E731
    masked = {"objective": "masked", "mask_rate": 0.3}
    reference = train(tiny_config(tmp_path, "pre", steps=300, eval_every=150, log_every=10, **masked), log=quiet)
    records = strip_timing(tmp_path / "pre" / "metrics.jsonl")
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    assert np.mean(train_losses[-3:]) < 0.8 * train_losses[0]  # from ln 17 towards the structure
    # above always naming the commonest token ("]", 12% of the tokens): the operator comes first, "]" last
    assert reference.test_accuracy > 0.15

    # resumed after SIGINT == unbroken
    short = {"steps": 8, "eval_every": 2, "log_every": 1, **masked}
    train(tiny_config(tmp_path, "whole", **short), log=quiet)
    monkeypatch.setattr(metrics.MetricsLog, "write", signal_after(5, "train", signal.SIGINT))
    assert train(tiny_config(tmp_path, "cut", **short), log=quiet).interrupted
    monkeypatch.undo()
    train(resume=tmp_path / "cut", log=quiet)
    assert strip_timing(tmp_path / "cut" / "metrics.jsonl") == strip_timing(tmp_path / "whole" / "metrics.jsonl")

    # hopformer eval on a pretraining run scores hidden tokens, with the masks validation used
    command = ["eval", "--checkpoint", str(tmp_path / "pre"), "--split", "val", "--batch-size", "16", "--json"]
    assert cli_main(command) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scored["accuracy"] == pytest.approx(reference.best_val_accuracy)

    # a classifier starts from the pretrained encoder
    logs: list[str] = []
    train(tiny_config(tmp_path, "fine", steps=2, init_from=str(tmp_path / "pre")), log=logs.append)
    assert any("encoder weights from" in line and "pre" in line for line in logs)
    pretrained = load_weights_file(str(tmp_path / "pre" / "best" / "model.safetensors"))
    from hopformer.models.hf_format import encoder_config

    saved = vars(encoder_config(json.loads((tmp_path / "pre" / "best" / "config.json").read_text())))
    # the classifier's table has no mask row: the task's ids only
    classifier = SequenceClassifier(
        TransformerEncoder(EncoderConfig(**{**saved, "vocab_size": saved["vocab_size"] - 1})), 10
    )
    assert load_encoder_weights(classifier, tmp_path / "pre").name == "best"
    for name, tensor in classifier.encoder.state_dict().items():
        assert torch.equal(tensor, pretrained[f"encoder.{name}"][: len(tensor)]), name
    with pytest.raises(ValueError, match="train.init_from=.*does not fit"):
        narrow = EncoderConfig(**{**saved, "dim": 16, "mlp_dim": 16})
        load_encoder_weights(SequenceClassifier(TransformerEncoder(narrow), 10), tmp_path / "pre")
    with pytest.raises(FileNotFoundError, match="train.init_from=.*nowhere: no checkpoint"):
        load_encoder_weights(classifier, tmp_path / "nowhere")
    with pytest.raises(ValueError, match="train.objective='mlm' is not known"):
        train(tiny_config(tmp_path, "bad", objective="mlm"), log=quiet)
    with pytest.raises(ValueError, match="train.mask_rate must be in"):
        train(tiny_config(tmp_path, "bad", objective="masked", mask_rate=0.0), log=quiet)


@pytest.mark.parametrize("embedding", ["intensity", "conv"])
def test_pixel_embeddings_pretrain_and_start_a_classifier(tmp_path, data, embedding):
    """``model.embedding=intensity|conv`` on Pathfinder: masked pretraining (a mask row beside the grey levels),
    then a classifier from that encoder (no mask row); a text task refuses it by name."""
    from hopformer.data.pathfinder import generate_pathfinder
    from hopformer.models import EncoderConfig, SequenceClassifier, TransformerEncoder
    from hopformer.train.build import load_encoder_weights

    generate_pathfinder(tmp_path / "pf", n=40, workers=1, progress=False)
    quiet = lambda *_: None  # noqa: E731

    def config(run: str, **train_settings) -> Config:
        settings = {
            "task": "pathfinder32",
            "data": {"data_dir": str(tmp_path / "pf")},
            "model": {"dim": 16, "depth": 1, "heads": 2, "mlp_dim": 16, "embedding": embedding},
            "train": {"steps": 6, "batch_size": 8, "eval_every": 3, "log_every": 1, "progress": False,
                      "device": "cpu", "threads": 1, "run_dir": str(tmp_path / run), **train_settings},
        }  # fmt: skip
        return from_dict(settings)

    pretrained = train(config("pre", objective="masked", mask_rate=0.2), log=quiet)
    assert pretrained.step == 6 and np.isfinite(pretrained.best_val_accuracy)
    logs: list[str] = []
    fine = train(config("fine", init_from=str(tmp_path / "pre")), log=logs.append)
    assert fine.step == 6 and any("encoder weights from" in line for line in logs)
    pre = load_file(str(tmp_path / "pre" / "best" / "model.safetensors"))
    fine_weights = load_file(str(tmp_path / "fine" / "last" / "model.safetensors"))
    assert pre["encoder.embed.special.weight"].shape == (1, 16) and "encoder.embed.special.weight" not in fine_weights
    from hopformer.models.hf_format import encoder_config

    saved = vars(encoder_config(json.loads((tmp_path / "pre" / "best" / "config.json").read_text())))
    classifier = SequenceClassifier(TransformerEncoder(EncoderConfig(**{**saved, "vocab_size": 256})), 2)
    load_encoder_weights(classifier, tmp_path / "pre")
    for name, tensor in classifier.encoder.state_dict().items():
        assert torch.equal(tensor, pre[f"encoder.{name}"]), name
    text = tiny_config(tmp_path, "text")
    text.model.embedding = embedding
    with pytest.raises(ValueError, match=f"embedding='{embedding}'.*pixel tasks"):
        train(text, log=quiet)


def test_optimizer_decays_weight_matrices_only():
    """Weight decay reaches the projection matrices, not biases, LayerNorm gains or Diffuser's learned hop
    weights (softmax logits or free weights)."""
    from hopformer.attention import build

    options = dict(dim=16, heads=2, block_size=16, hops=2)
    model = torch.nn.Sequential(
        build("diffuser", **options, learned_coefficients=True),
        build("diffuser", **options, learned_coefficients="free"),
        torch.nn.LayerNorm(16),
    )
    optimizer = optim.make_optimizer(model, from_dict({"optim": {"weight_decay": 0.05}}))
    decayed, plain = ({id(p) for p in group["params"]} for group in optimizer.param_groups)
    assert optimizer.param_groups[0]["weight_decay"] == 0.05 and optimizer.param_groups[1]["weight_decay"] == 0.0
    assert {id(model[0].hop_logits), id(model[1].hop_weights), id(model[2].weight)} <= plain
    hop = ("hop_logits", "hop_weights")
    matrices = {id(p) for name, p in model.named_parameters() if p.dim() >= 2 and not name.endswith(hop)}
    assert matrices and decayed == matrices
    assert decayed | plain == {id(p) for p in model.parameters()}


def test_hop_lr_scale_gives_the_hop_weights_their_own_rate(tmp_path, data):
    """``optim.hop_lr_scale`` puts Diffuser's learned hop weights in a group of their own, the loop scales the
    scheduled rate for it, and Adam's first steps move them in proportion (about ``lr`` per step)."""
    from hopformer.attention import build

    layer = build("diffuser", dim=16, heads=2, block_size=16, hops=2, learned_coefficients=True)
    optimizer = optim.make_optimizer(layer, from_dict({"optim": {"hop_lr_scale": 10.0}}))
    assert [len(g["params"]) for g in optimizer.param_groups][2] == 1
    assert optimizer.param_groups[2]["params"][0] is layer.hop_logits
    assert optimizer.param_groups[2]["lr_scale"] == 10.0 and optimizer.param_groups[2]["weight_decay"] == 0.0

    quiet = lambda *_: None  # noqa: E731
    moved = {}
    for scale in (1.0, 10.0):
        config = tiny_config(tmp_path, f"scale{scale}", steps=3, eval_every=3)
        config.model.attention = "diffuser"
        config.model.attention_options = {"block_size": 16, "hops": 2, "learned_coefficients": True}
        config.optim.hop_lr_scale = scale
        train(config, log=quiet)
        state = torch.load(tmp_path / f"scale{scale}" / "last" / "state.pt", weights_only=True)
        weights = load_file(tmp_path / f"scale{scale}" / "last" / "model.safetensors")
        logits = [v for k, v in weights.items() if k.endswith("hop_logits")]
        start = build("diffuser", dim=32, heads=2, hops=2, learned_coefficients=True).hop_logits.detach()
        moved[scale] = max((v - start).abs().max().item() for v in logits)
        lrs = [g["lr"] for g in state["optimizer"]["param_groups"]]
        if scale == 1.0:
            assert len(lrs) == 2
        else:
            assert len(lrs) == 3 and lrs[2] == pytest.approx(scale * lrs[0]) and lrs[0] > 0
    assert moved[10.0] > 5 * moved[1.0] > 0, moved
    for bad in (0.0, -1.0, True):
        config = tiny_config(tmp_path, "bad")
        config.optim.hop_lr_scale = bad
        with pytest.raises(ValueError, match=f"optim.hop_lr_scale must be a positive number, got {bad!r}"):
            train(config, log=quiet)


def test_a_bad_attention_option_fails_before_the_data_loads(tmp_path):
    config = tiny_config(tmp_path)  # no data folder: the option is checked first
    config.model.attention = "bigbird"
    config.model.attention_options = {"hops": 2}
    with pytest.raises(ValueError, match=r"attention='bigbird' has no option 'hops' \(got hops=2\); it takes \["):
        train(config, log=lambda *_: None)
    assert not (tmp_path / "run").exists()
