"""A whole training step compiled and eager: the ListOps model and the byte-level LM, side by side on one device.

Issue 42, part 2: with hopformer's ops registered as ``torch.library`` custom ops, ``torch.compile(model,
fullgraph=True)`` traces a whole model. How much faster is a training step (forward, backward, optimizer) compiled?

Models (``--models``):

- ``listops``: ``configs/listops_small.yaml`` (the CPU default of ``hopformer train``) with ``--attention``
  (default ``diffuser``): a 2-layer classifier of 10 classes, batch 32, trees padded to ``--listops-len`` tokens
  (each example's real length uniform in [10, the length]: padding masks as in training).
- ``bytes``: ``configs/bytes_small.yaml`` (the default of ``hopformer train --task bytes``) with ``--attention``: a
  2-layer causal byte LM, batch 16 x 256 tokens.

One step is what ``hopformer train`` runs: forward under bf16 autocast on CUDA (float32 on the CPU), cross-entropy,
backward, gradient clipping, AdamW. Eager and compiled models start from the same weights and see the same batches;
the compiled one is ``torch.compile(model, fullgraph=True, mode=--mode)`` (the first steps compile: their time is
reported as ``compile_s``, not in ``ms``). Steps are timed in alternating blocks (eager, compiled, eager, ...) with a
device synchronisation per step; ``ms`` is the median step. Writes one JSON (command, device, versions, one row per
model) and prints a table::

    python experiments/compile_step_gpu.py --out compile_step_h100.json                 # on the GPU
    python experiments/compile_step_gpu.py --device cpu --steps 3 --out /tmp/smoke.json  # CPU smoke test
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hopformer.bench.harness import command_line, environment, write_json  # noqa: E402
from hopformer.models import CausalLM, SequenceClassifier, TransformerEncoder  # noqa: E402
from hopformer.train.batches import batch_multiple  # noqa: E402
from hopformer.train.build import language_model_config  # noqa: E402
from hopformer.train.config import load_config  # noqa: E402
from hopformer.train.optim import make_optimizer, optimizer_step  # noqa: E402
from hopformer.train.tasks import TASKS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def listops_setup(args, device):
    """The ListOps classifier of configs/listops_small.yaml, its optimizer, and batches."""
    config = load_config(ROOT / "configs" / "listops_small.yaml", {"model.attention": args.attention})
    spec = TASKS["listops"]
    length = args.listops_len
    encoder = replace(config.model, vocab_size=spec.vocab_size, max_len=length, pad_id=0,
                      pad_to_multiple=config.data.pad_to_multiple or batch_multiple(config))  # fmt: skip
    torch.manual_seed(0)
    model = SequenceClassifier(TransformerEncoder(encoder), spec.num_classes, pooling=config.head.pooling).to(device)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        batch = config.train.batch_size
        ids = torch.randint(1, spec.vocab_size, (batch, length), generator=generator)
        lengths = torch.randint(10, length + 1, (batch,), generator=generator)
        mask = torch.arange(length)[None, :] < lengths[:, None]
        labels = torch.randint(0, spec.num_classes, (batch,), generator=generator)
        batches.append((ids.masked_fill(~mask, 0).to(device), mask.long().to(device), labels.to(device)))

    def loss_of(model, batch):
        ids, mask, labels = batch
        return F.cross_entropy(model(ids, mask).float(), labels)

    shape = {"batch": config.train.batch_size, "seq_len": length}
    return config, model, batches, loss_of, shape


def bytes_setup(args, device):
    """The byte-level causal LM of configs/bytes_small.yaml, its optimizer, and batches of random bytes."""
    config = load_config(ROOT / "configs" / "bytes_small.yaml", {"model.attention": args.attention})
    torch.manual_seed(0)
    model = CausalLM(language_model_config(config, SimpleNamespace(vocab_size=256))).to(device)
    batch, length = config.train.batch_size, config.data.max_length
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (batch, length + 1), generator=generator).to(device) for _ in range(4)]

    def loss_of(model, windows):
        logits = model(windows[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), windows[:, 1:].flatten())

    return config, model, batches, loss_of, {"batch": batch, "seq_len": length}


SETUPS = {"listops": listops_setup, "bytes": bytes_setup}


def measure(name: str, args, device: torch.device) -> dict:
    config, model, batches, loss_of, shape = SETUPS[name](args, device)
    compiled_model = copy.deepcopy(model)  # the same weights
    runners = {
        "eager": (model, make_optimizer(model, config)),
        "compiled": (
            torch.compile(compiled_model, fullgraph=True, mode=args.mode, backend=args.backend),
            make_optimizer(compiled_model, config),
        ),
    }
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(kind: str, index: int) -> float:
        runner, optimizer = runners[kind]
        sync()
        began = time.perf_counter()
        with autocast:
            loss = loss_of(runner, batches[index % len(batches)])
        loss.backward()
        optimizer_step(runner, optimizer, config.optim.grad_clip)
        sync()
        return (time.perf_counter() - began) * 1e3, float(loss.detach())

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    first = {}
    for kind in runners:  # the first steps: compilation (forward and backward graphs)
        began = time.perf_counter()
        for index in range(args.warmup):
            step(kind, index)
        first[kind] = time.perf_counter() - began
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = {kind: [] for kind in runners}
    losses = {kind: [] for kind in runners}
    peaks = {}
    block = max(1, args.steps // args.blocks)
    for index in range(args.blocks):
        for kind in runners:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for offset in range(block):
                ms, loss = step(kind, args.warmup + index * block + offset)
                times[kind].append(ms)
                losses[kind].append(loss)
            if device.type == "cuda":
                peaks[kind] = max(peaks.get(kind, 0.0), torch.cuda.max_memory_allocated(device) / 2**20)
    eager, compiled = statistics.median(times["eager"]), statistics.median(times["compiled"])
    row = {
        "model": name,
        "attention": args.attention,
        **shape,
        "parameters": sum(p.numel() for p in model.parameters()),
        "eager_ms": eager,
        "compiled_ms": compiled,
        "compiled_over_eager": compiled / eager,
        "speedup": eager / compiled,
        "eager_ms_all": [round(t, 3) for t in times["eager"]],
        "compiled_ms_all": [round(t, 3) for t in times["compiled"]],
        "warmup_s": {kind: round(seconds, 2) for kind, seconds in first.items()},
        "compile_s": round(first["compiled"] - first["eager"], 2),
        "graphs": int(counters["stats"].get("unique_graphs", 0)),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "last_loss": {kind: round(values[-1], 5) for kind, values in losses.items()},
    }
    if peaks:
        row["peak_memory_mib"] = {kind: round(value, 1) for kind, value in peaks.items()}
    print(
        f"{name:>8} [{args.attention}] batch {shape['batch']} x {shape['seq_len']}: eager {eager:8.2f} ms, "
        f"compiled {compiled:8.2f} ms ({eager / compiled:.2f}x faster), compile {row['compile_s']:.1f} s, "
        f"{row['graphs']} graph(s), {row['graph_breaks']} break(s)"
    )
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke test)")
    parser.add_argument("--models", default="listops,bytes", help="comma-separated: listops, bytes")
    parser.add_argument("--attention", default="diffuser")
    parser.add_argument("--listops-len", type=int, default=128, help="ListOps batch width (trees up to 100 tokens)")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per mode")
    parser.add_argument("--blocks", type=int, default=3, help="alternating blocks of eager and compiled steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps (compilation)")
    parser.add_argument("--mode", default=None, help="torch.compile mode (default, reduce-overhead, max-autotune)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--out", default=None, help="JSON to write")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu for the smoke test")
    args.blocks = max(1, min(args.blocks, args.steps))
    rows = [measure(name, args, device) for name in args.models.split(",")]
    record = {
        "environment": {**environment(device), "command": command_line(argv)},
        "settings": {key: value for key, value in vars(args).items() if key != "out"},
        "rows": rows,
    }
    try:
        import triton

        record["environment"]["triton"] = triton.__version__
    except ImportError:
        pass
    if args.out:
        write_json(args.out, record)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
