"""Training on two CPU processes (torchrun, gloo): DDP and FSDP2 give the single-process losses of the same global
batch, the first log line names the parallelism, checkpoints saved under two processes resume under one, and
Routing's centroids stay identical on every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch.distributed as dist

from hopformer.cli import main
from hopformer.train import train
from hopformer.train.config import load_config

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {  # a small full-attention model without dropout: its losses depend on the batch only
    "task": "listops",
    "model.dim": 32,
    "model.depth": 1,
    "model.heads": 2,
    "model.mlp_dim": 64,
    "model.dropout": 0.0,
    "optim.schedule": "constant",
    "optim.warmup_steps": 2,
    "train.batch_size": 8,
    "train.grad_accum": 2,  # two micro-batches of 4: 2 rows per process each
    "train.eval_every": 2,
    "train.log_every": 1,
    "train.device": "cpu",
    "train.threads": 1,
    "train.progress": False,
}


def torchrun(args: list[str], cwd: Path, processes: int = 2) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def train_args(run: Path, data: Path, steps: int, *extra: str) -> list[str]:
    sets = [f"--set={key}={value}" for key, value in SETTINGS.items()]
    return ["-m", "hopformer", "train", *sets, f"--data-dir={data}", f"--steps={steps}", f"--run-dir={run}", *extra]


def losses(run: Path) -> list[tuple]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["split"], r["step"], r["loss"], r["accuracy"]) for r in records]


def assert_same_losses(got: list[tuple], expected: list[tuple]) -> None:
    assert [r[:2] for r in got] == [r[:2] for r in expected]
    for a, b in zip(got, expected):
        assert a[2] == pytest.approx(b[2], rel=0, abs=1e-5), (a, b)  # float summation order only
        assert a[3] == b[3], (a, b)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """ListOps data and the single-process reference run of 4 steps."""
    root = tmp_path_factory.mktemp("distributed")
    data = root / "data"
    assert main(["data", "listops", "--out", str(data), "--train", "96", "--val", "32", "--test", "32"]) == 0
    overrides = {**SETTINGS, "data.data_dir": str(data), "train.steps": 4, "train.run_dir": str(root / "single")}
    train(load_config(None, overrides), log=lambda *_: None)
    return root, data, losses(root / "single")


def test_ddp_on_two_processes_gives_the_single_process_losses(setup):
    root, data, expected = setup
    result = torchrun(train_args(root / "ddp", data, 4), root)
    first = result.stdout.strip().splitlines()[0]
    assert first.startswith("DDP, world size 2 (gloo)"), result.stdout
    finals = [line for line in result.stdout.splitlines() if line.startswith("test accuracy ")]
    assert len(finals) == 1 and result.stdout.count("best val accuracy") == 1, result.stdout  # rank 1 is quiet
    assert_same_losses(losses(root / "ddp"), expected)
    saved = json.loads((root / "ddp" / "results.json").read_text())
    assert saved["test_loss"] == pytest.approx(expected[-1][2], abs=1e-5)


def test_fsdp_checkpoint_saved_under_two_processes_resumes_under_one(setup):
    root, data, expected = setup
    result = torchrun(train_args(root / "fsdp", data, 2, "--set=train.parallel=fsdp"), root)
    assert result.stdout.strip().splitlines()[0].startswith("FSDP2 (fully_shard), world size 2 (gloo)")
    state = (root / "fsdp" / "last" / "model.safetensors").is_file()
    assert state and not list((root / "fsdp").glob(".*tmp*"))  # written whole, by rank 0, no leftovers
    # the same run continued by a single process: the single-process numbers, step for step
    train(resume=root / "fsdp", resume_overrides={"train.steps": 4}, log=lambda *_: None)
    assert_same_losses(losses(root / "fsdp"), expected)


WORKER = """
import torch, torch.distributed as dist
from hopformer.attention import build
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)  # the same module on both ranks
module = build("routing", 16, 2, local_heads=1, clusters=3, local_window=4, decay=0.5)
torch.manual_seed(100 + rank)  # different data on each rank
for _ in range(4):
    module(torch.randn(2, 12, 16)).sum().backward()
module.update_centroids()
gathered = [torch.empty_like(module.centroids) for _ in range(2)]
dist.all_gather(gathered, module.centroids)
assert bool(module.initialised) and torch.equal(gathered[0], gathered[1]), "centroids differ across ranks"
if rank == 0:
    print("centroids identical")
dist.destroy_process_group()
"""


def test_routing_centroids_stay_identical_on_every_rank(tmp_path):
    script = tmp_path / "routing_worker.py"
    script.write_text(textwrap.dedent(WORKER))
    assert "centroids identical" in torchrun([str(script)], tmp_path).stdout


def test_each_rank_gets_its_rows_of_the_single_process_batches(setup):
    """The feeds' shares (no processes needed): the ranks' rows, put together, are the single-process batch, hidden
    tokens and their labels included (masked objective), and so are the byte windows of the causal LM, the masked
    windows of a masked LM and the images of a pixel model."""
    import numpy as np
    import torch

    from hopformer.data.corpus import Corpus
    from hopformer.data.images import ImageSet
    from hopformer.train.batches import Runtime
    from hopformer.train.distributed import Parallel, rows
    from hopformer.train.feeds import ExampleFeed, MaskedWindowFeed, PixelFeed, WindowFeed
    from hopformer.train.tasks import load_task

    _, data_dir, _ = setup
    config = load_config(None, {**SETTINGS, "data.data_dir": str(data_dir), "train.objective": "masked"})
    task = load_task(config, progress=False, log=lambda *_: None)
    runtime = Runtime(torch.device("cpu"), False, 16, 2000, mask_rate=0.3, mask_id=20)
    shares = [rows(Parallel("ddp", rank, 2), 4) for rank in range(2)]
    whole, parts = ExampleFeed(task, config, runtime), [ExampleFeed(task, config, runtime, rows=r) for r in shares]
    for step in range(3):
        inputs, labels, tokens = whole.next_batch(step, 0)
        pieces = [part.next_batch(step, 0) for part in parts]
        for key in inputs:
            assert torch.equal(torch.cat([piece[0][key] for piece in pieces]), inputs[key]), key
        assert torch.equal(torch.cat([piece[1] for piece in pieces]), labels) and len(labels) > 0
        assert sum(piece[2] for piece in pieces) == tokens

    corpus = Corpus({split: np.arange(5000, dtype=np.uint8) for split in ("train", "val", "test")}, "ramp")
    pixels = np.random.default_rng(0).integers(0, 256, (40, 4 * 4 * 3), dtype=np.uint8)
    images = ImageSet({"train": pixels[:20], "val": pixels[20:30], "test": pixels[30:]}, (4, 4, 3), "noise")
    cases = [
        (WindowFeed, corpus, {"task": "bytes"}),
        (MaskedWindowFeed, corpus, {"task": "bytes", "train.objective": "masked", "train.mask_rate": 0.3}),
        (PixelFeed, images, {"task": "pixels"}),
    ]
    for feed, data, settings in cases:
        config = load_config(None, {**settings, "data.max_length": 64, "train.batch_size": 8})
        whole = feed(data, config, runtime, config.task)
        parts = [feed(data, config, runtime, config.task, rows=r) for r in (slice(0, 4), slice(4, 8))]
        inputs, targets, tokens = whole.next_batch(5, 0)
        pieces = [part.next_batch(5, 0) for part in parts]
        for key in inputs:
            assert torch.equal(torch.cat([piece[0][key] for piece in pieces]), inputs[key]), (feed.__name__, key)
        assert torch.equal(torch.cat([piece[1] for piece in pieces]), targets) and len(targets) > 0, feed.__name__
        assert sum(piece[2] for piece in pieces) == tokens, feed.__name__
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        rows(Parallel("ddp", 0, 3), 4)
