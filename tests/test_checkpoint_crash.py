"""Checkpoints survive real crashes: a process that writes a checkpoint is killed (SIGKILL, no cleanup, no
``finally``) before each file-system step of :func:`save_checkpoint` in turn (every write, rename, removal,
folder and fsync) and in the middle of each file write; what is left on disk must hold a complete checkpoint
(the old one or the new one, the new one whenever it is in place), resume from it, and tidy up on the next save.

The crashing process is a fork of the test process (it has torch and the model already: milliseconds per crash);
the end-to-end test kills a real training run (a fresh interpreter) while it saves ``last/`` and resumes it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file

import hopformer
from hopformer.models import EncoderConfig, SequenceClassifier, TransformerEncoder
from hopformer.train import BatchStream
from hopformer.train import checkpoint as checkpoint_module
from hopformer.train.checkpoint import find_checkpoint, load_state, resume_training, save_checkpoint

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills forked processes (POSIX)")

REPO = Path(hopformer.__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------- the crash
# File-system steps, by the name under which a step is logged: the os functions (shutil.rmtree and
# tempfile.mkstemp go through them, so a crash can hit the middle of a tree removal) and the three
# writers of a checkpoint's files.
OS_STEPS = ("replace", "rename", "unlink", "remove", "rmdir", "mkdir", "fsync", "chmod", "open")
WRITERS = ("torch.save", "save_file", "write_text")


def install_crash(kill_at: int, partial: bool, log_fd: int, only: str | None = None, call: int = 1) -> None:
    """In the process that will crash: log every file-system step of ``save_checkpoint`` (to ``log_fd``, one
    line each, before the step runs) and SIGKILL this process before step ``kill_at`` (1-based; 0: never).
    With ``partial``, a writer that is hit first writes half of its bytes. ``only``/``call``: count the steps
    of the ``call``-th save into a folder named ``only`` alone (the trainer saves ``last/`` and ``best/``)."""
    state = {"active": False, "steps": 0, "calls": 0}

    def log(line: str) -> None:
        os.write(log_fd, (line.replace("\n", " ") + "\n").encode())

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def step(name: str, real, path_arg: int | None = 0):
        def wrapped(*args, **kwargs):
            if not state["active"]:
                return real(*args, **kwargs)
            if name == "open":  # opening for writing creates a file (mkstemp); reading is no step
                flags = args[1] if len(args) > 1 else kwargs.get("flags", 0)
                if not flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                    return real(*args, **kwargs)
            state["steps"] += 1
            where = "" if path_arg is None or len(args) <= path_arg else str(args[path_arg])
            log(f"{state['steps']} {name} {where}")
            if state["steps"] == kill_at:
                state["active"] = False  # the crash's own files are no steps
                if partial and name in WRITERS:
                    write_half(name, real, args, kwargs)
                die()
            return real(*args, **kwargs)

        return wrapped

    def write_half(name, real, args, kwargs):
        with tempfile.TemporaryDirectory() as scratch:  # the real bytes, written elsewhere first
            whole = Path(scratch) / "whole"
            if name == "write_text":
                real(whole, *args[1:], **kwargs)
                target = args[0]
            elif name == "torch.save":
                real(args[0], whole, *args[2:], **kwargs)
                target = args[1]
            else:
                real(args[0], str(whole), *args[2:], **kwargs)
                target = args[1]
            data = whole.read_bytes()
        with open(target, "wb") as file:
            file.write(data[: len(data) // 2])
            file.flush()
            os.fsync(file.fileno())

    for name in OS_STEPS:
        setattr(os, name, step(name, getattr(os, name)))
    torch.save = step("torch.save", torch.save, 1)
    safetensors.torch.save_file = step("save_file", safetensors.torch.save_file, 1)
    Path.write_text = step("write_text", Path.write_text)

    real_save = checkpoint_module.save_checkpoint

    def save(directory, *args, **kwargs):
        if only is None or Path(directory).name == only:
            state["calls"] += 1
        state["active"] = only is None or (Path(directory).name == only and state["calls"] == call)
        try:
            return real_save(directory, *args, **kwargs)
        finally:
            state["active"] = False

    checkpoint_module.save_checkpoint = save


def crash_in_fork(kill_at: int, partial: bool, log_path: Path, work) -> tuple[int, list[str]]:
    """Run ``work()`` in a forked child with :func:`install_crash`; returns the child's fate (the signal that
    ended it, or 0 for a normal exit) and the steps it logged."""
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.12+: fork with threads
        pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 0
        try:
            install_crash(kill_at, partial, log_fd)
            work()
        except BaseException:
            code = 3
        os._exit(code)
    os.close(log_fd)
    _, status = os.waitpid(pid, 0)
    fate = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
    assert fate or os.WEXITSTATUS(status) == 0, "the child failed before its crash"
    return fate, log_path.read_text().splitlines()


# -------------------------------------------------------------------------------------------- the unit
def tiny_model(seed: int) -> SequenceClassifier:
    torch.manual_seed(seed)
    encoder = EncoderConfig(vocab_size=12, dim=16, depth=1, heads=2, mlp_dim=32, max_len=32, attention="full")
    return SequenceClassifier(TransformerEncoder(encoder), num_classes=3)


def training_state(model: torch.nn.Module, step: int) -> tuple[dict, torch.optim.Optimizer, BatchStream]:
    """What the trainer keeps beside the weights: an optimiser with moments, the data order, the step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for parameter in model.parameters():
        parameter.grad = torch.full_like(parameter, 0.5)
    optimizer.step()  # the moments exist now
    stream = BatchStream([5] * 40, batch_size=4, seed=step)
    for _ in range(step):
        stream.next()
    state = {"step": step, "optimizer": optimizer.state_dict(), "data": stream.state_dict()}
    state["rng"] = checkpoint_module.rng_state()
    return state, optimizer, stream


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_complete(folder: Path, expected: dict[int, dict[str, torch.Tensor]]) -> int:
    """``folder`` holds a whole checkpoint of one of the ``expected`` steps; returns that step."""
    step = int(load_state(folder)["step"])
    assert step in expected, f"{folder} holds step {step}"
    assert json.loads((folder / "config.json").read_text())["model_type"]
    saved = load_file(str(folder / "model.safetensors"))
    assert saved.keys() == expected[step].keys() and all(torch.equal(saved[k], expected[step][k]) for k in saved)
    return step


@pytest.mark.parametrize("partial", [False, True], ids=["between-steps", "mid-write"])
def test_a_crash_anywhere_in_save_checkpoint_leaves_a_checkpoint_to_resume_from(tmp_path, partial):
    old_model, new_model = tiny_model(1), tiny_model(2)
    old_state, _, _ = training_state(old_model, 1)
    new_state, _, _ = training_state(new_model, 2)
    expected = {1: weights(old_model), 2: weights(new_model)}
    pristine = tmp_path / "pristine"
    save_checkpoint(pristine / "last", old_model, old_state)
    # a leftover of an earlier crash: the next save clears it first (more steps to crash in)
    shutil.copytree(pristine / "last", pristine / ".last.tmp")

    def run(kill_at: int) -> tuple[Path, int, list[str]]:
        folder = tmp_path / f"crash{kill_at}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(pristine, folder)
        fate, steps = crash_in_fork(
            kill_at,
            partial,
            tmp_path / "steps.log",
            lambda: checkpoint_module.save_checkpoint(folder / "last", new_model, new_state),
        )
        return folder, fate, steps

    _, fate, steps = run(0)
    assert fate == 0
    writes = [i + 1 for i, line in enumerate(steps) if line.split()[1] in WRITERS]
    renames = [i + 1 for i, line in enumerate(steps) if line.split()[1] in ("replace", "rename")]
    assert len(writes) >= 3 and len(renames) >= 4, steps  # config, weights, state; each file's rename, the swaps
    points = writes if partial else range(1, len(steps) + 1)
    for kill_at in points:
        folder, fate, logged = run(kill_at)
        assert fate == signal.SIGKILL and len(logged) == kill_at, (kill_at, logged)
        what = f"killed before step {logged[-1]!r}"
        found = find_checkpoint(folder / "last")
        assert found is not None, f"{what}: no checkpoint left ({sorted(p.name for p in folder.iterdir())})"
        step = assert_complete(found, expected)
        if (folder / "last" / "state.pt").exists():
            assert found == folder / "last", f"{what}: the checkpoint in place must be the one resumed"
            assert_complete(folder / "last", expected)

        # resume as the trainer does: weights, optimiser, data order and RNGs of the step found
        model = tiny_model(0)
        _, optimizer, stream = training_state(model, 0)
        resumed, source = resume_training(folder, model, optimizer, stream, steps=10)
        assert resumed.step == step and source == found, what
        assert all(torch.equal(weights(model)[k], v) for k, v in expected[step].items()), what
        assert stream.state_dict() == (old_state if step == 1 else new_state)["data"], what
        assert optimizer.state_dict()["state"][0]["step"] == 1

        # the next save goes through and leaves nothing else behind
        save_checkpoint(folder / "last", new_model, {**new_state, "step": 3})
        assert load_state(folder / "last")["step"] == 3, what
        assert sorted(p.name for p in folder.iterdir()) == ["last"], f"{what}: leftovers after the next save"
        assert sorted(p.name for p in (folder / "last").iterdir()) == ["config.json", "model.safetensors", "state.pt"]


# ---------------------------------------------------------------------------------------------- end to end
CHILD = """
import importlib.util, os, sys
sys.path.insert(0, {repo!r})
spec = importlib.util.spec_from_file_location("crash", {module!r})
crash = importlib.util.module_from_spec(spec)
spec.loader.exec_module(crash)
from hopformer.train import train
from hopformer.train.config import from_dict
log_fd = os.open({log!r}, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
crash.install_crash({kill_at}, {partial}, log_fd, only="last", call=2)
train(from_dict({config!r}), log=lambda *_: None)
"""


def listops_config(tmp_path: Path, run: str) -> dict:
    folder = tmp_path / "data"
    if not folder.exists():
        folder.mkdir()
        lines = ["Source\tTarget"] + [
            f"( [MAX {i % 10} {(3 * i) % 10} ] )\t{max(i % 10, 3 * i % 10)}" for i in range(48)
        ]
        for split in ("train", "val", "test"):
            (folder / f"basic_{split}.tsv").write_text("\n".join(lines) + "\n")
    return {
        "task": "listops",
        "data": {"data_dir": str(folder)},
        "model": {"dim": 16, "depth": 1, "heads": 2, "mlp_dim": 32, "dropout": 0.1},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"steps": 6, "batch_size": 8, "eval_every": 2, "log_every": 1, "progress": False,
                  "device": "cpu", "threads": 1, "run_dir": str(tmp_path / run)},
    }  # fmt: skip


@pytest.mark.slow
def test_a_training_run_killed_while_saving_resumes_to_the_same_result(tmp_path):
    """``hopformer train`` killed during its second save of ``last/`` (between the two renames that swap it in,
    and halfway through writing the state), then resumed: the same metrics and weights as the run never killed."""
    from hopformer.train import train

    def child(run: str, kill_at: int, partial: bool) -> tuple[int, list[str]]:
        log = tmp_path / f"{run}.log"
        code = CHILD.format(
            repo=str(REPO), module=__file__, log=str(log), kill_at=kill_at, partial=partial,
            config=listops_config(tmp_path, run),
        )  # fmt: skip
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert done.returncode in (0, -signal.SIGKILL), done.stderr[-3000:]
        return done.returncode, log.read_text().splitlines()

    def records(run: str) -> list[dict]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("_per_s")} for line in lines]

    code, steps = child("reference", 0, False)  # never killed; it lists the steps of that save
    assert code == 0, steps
    swap_in = next(
        i + 1 for i, line in enumerate(steps) if line.split()[1] == "replace" and line.split()[2].endswith(".last.tmp")
    )
    state_write = next(i + 1 for i, line in enumerate(steps) if line.split()[1] == "torch.save")
    reference = json.loads((tmp_path / "reference" / "results.json").read_text())
    for run, kill_at, partial in (("between-the-renames", swap_in, False), ("mid-state-write", state_write, True)):
        code, logged = child(run, kill_at, partial)
        assert code == -signal.SIGKILL and len(logged) == kill_at, logged
        assert find_checkpoint(tmp_path / run / "last") is not None, run

        final = train(resume=tmp_path / run, log=lambda *_: None)
        assert (final.step, final.test_accuracy) == (reference["step"], reference["test_accuracy"]), run
        assert records(run) == records("reference"), run
        for name in ("last", "best"):
            a = load_file(str(tmp_path / "reference" / name / "model.safetensors"))
            b = load_file(str(tmp_path / run / name / "model.safetensors"))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (run, name)
        assert [p.name for p in (tmp_path / run).iterdir() if p.name.startswith(".")] == [], run
