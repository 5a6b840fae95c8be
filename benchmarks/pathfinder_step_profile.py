"""Where a Pathfinder-32 training step's time goes on CUDA (conv recipe, lr 1e-3, lit-pixel mask, batch 256).

Variants: bigbird on FlexAttention with hopformer's tuned tiles and with Inductor's defaults, bigbird on
hopformer's Triton kernels (which mask padding inside the tiles), one-hop Diffuser (Triton kernels) and
full attention (SDPA), each eager and some under ``torch.compile``. Each is timed three ways: with a
fresh batch collated on the CPU each step (``full_step_ms``, the trainer's loop), the same with the batch
copied from pinned memory (``pinned_step_ms``), and on one batch already on the GPU
(``fixed_batch_step_ms``: model and optimiser only). For eager bigbird on FlexAttention it also lists the
FlexAttention kernels' mean CUDA microseconds. Any data folder holding ``pathfinder32/`` works; a small
generated set is enough (``hopformer data pathfinder --out /tmp/pfs --n 6000``).

    python benchmarks/pathfinder_step_profile.py --data-dir /tmp/pfs --out benchmarks/results/step.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hopformer.ops.flex as flex_backend  # noqa: E402
from hopformer.bench.harness import command_line, environment, write_json  # noqa: E402
from hopformer.data.batching import collate  # noqa: E402
from hopformer.train.batches import BatchStream, Runtime, masking, max_tokens, next_training_batch, prefix_length  # noqa: E402
from hopformer.train.build import build_model  # noqa: E402
from hopformer.train.config import load_config  # noqa: E402
from hopformer.train.evaluation import objective_loss  # noqa: E402
from hopformer.train.optim import make_optimizer  # noqa: E402
from hopformer.train.tasks import load_task  # noqa: E402

CONFIG = "configs/lra/pathfinder32_pytorch_conv.yaml"
ONE_HOP = {"attention": "diffuser", "attention_options": {"hops": 1}}
# (name, model settings, torch.compile the model, FlexAttention tiles: tuned / inductor / - (no flex))
VARIANTS = [
    ("bigbird", {"attention": "bigbird"}, False, "tuned"),
    ("bigbird", {"attention": "bigbird"}, False, "inductor"),
    ("bigbird", {"attention": "bigbird"}, True, "tuned"),
    ("bigbird", {"attention": "bigbird"}, True, "inductor"),
    ("bigbird-triton", {"attention": "bigbird", "attention_options": {"backend": "triton"}}, False, "-"),
    ("diffuser1", ONE_HOP, False, "-"),
    ("diffuser1", ONE_HOP, True, "-"),
    ("full", {"attention": "full"}, False, "-"),
    ("full", {"attention": "full"}, True, "-"),
]


def timed(fn, repeats: int) -> float:
    """Mean milliseconds per call of ``fn`` (synchronised at both ends)."""
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - began) / repeats * 1e3


def profile_variant(data, base: dict, model_settings: dict, compiled: bool, repeats: int) -> dict:
    device = torch.device("cuda")
    config = load_config(CONFIG, {**base, "model": {**model_settings, "pad_to_multiple": 128}})
    torch.manual_seed(0)
    model = build_model(config, data).to(device)
    run = torch.compile(model) if compiled else model
    optimizer = make_optimizer(model, config)
    runtime = Runtime(device, True, 128, max_tokens(model), prefix_length(model), **masking(model, config))
    train = data.splits["train"]
    stream = BatchStream([len(e["input_ids"]) for e in train], 256, 0, config.data.bucket)
    fixed, fixed_labels, _ = runtime.batch(next_training_batch(train, stream, config))

    def pinned_batch():
        batch = collate(next_training_batch(train, stream, config), max_length=runtime.max_length)
        batch = {key: value.pin_memory().to(device, non_blocking=True) for key, value in batch.items()}
        return batch, batch.pop("label")

    def step(inputs=None, labels=None, pin=False):
        if inputs is None:
            inputs, labels = pinned_batch() if pin else runtime.batch(next_training_batch(train, stream, config))[:2]
        with runtime.context():
            loss, _, _ = objective_loss(run(**inputs).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    began = time.perf_counter()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    row = {"warmup_s": time.perf_counter() - began}
    for _ in range(10):
        step()
    row["full_step_ms"] = timed(step, repeats)
    row["pinned_step_ms"] = timed(lambda: step(pin=True), repeats)
    row["fixed_batch_step_ms"] = timed(lambda: step(fixed, fixed_labels), repeats)
    row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if model_settings == {"attention": "bigbird"} and not compiled:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step(fixed, fixed_labels)
            torch.cuda.synchronize()
        row["flex_kernels_us"] = [
            (event.key, round(event.device_time_total / event.count, 1))
            for event in prof.key_averages()
            if "flex" in event.key and event.device_time_total > 0
        ]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data/lra_release", help="folder holding pathfinder32/")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--out", default="benchmarks/results/pathfinder_step_profile.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("pathfinder_step_profile.py profiles CUDA training steps; no GPU here", file=sys.stderr)
        return 1
    base = {"data": {"data_dir": args.data_dir, "mask_black_pixels": True}, "optim": {"lr": 1e-3}}
    data = load_task(load_config(CONFIG, base), progress=False)
    tuned = flex_backend.default_kernel_options
    rows = {}
    for name, settings, compiled, tiles in VARIANTS:
        key = f"{name} compile={compiled} flex={tiles}"
        flex_backend.default_kernel_options = (
            (lambda q: dict(flex_backend.TUNED_KERNEL_OPTIONS)) if tiles == "tuned" else (lambda q: None)
        )
        try:
            rows[key] = profile_variant(data, base, settings, compiled, args.repeats)
        except Exception as error:  # one variant failing (e.g. a compile error) must not lose the others
            traceback.print_exc()
            rows[key] = {"error": repr(error)[:500]}
        finally:
            flex_backend.default_kernel_options = tuned
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            torch._dynamo.reset()
        print(key, json.dumps(rows[key]), flush=True)
    result = {"command": command_line(argv), "environment": environment(torch.device("cuda")), "rows": rows}
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
