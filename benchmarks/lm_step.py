"""Training steps of the byte-level causal LM per attention, each alone on the device: tokens/s and peak memory.

    python benchmarks/lm_step.py --config configs/bytes_4k.yaml \
        --attentions full,bigbird,diffuser,routing,combiner,hypercube --out lm_step.json

Every attention runs the same model (the config's, causal) on the same random byte windows, under bf16 autocast
on CUDA, with AdamW; after ``--warmup`` steps, ``--steps`` are timed (synchronised) and the peak memory of the
whole step is read. Writes one JSON with the command, device, versions and a row per attention.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hopformer.bench.harness import command_line, environment  # noqa: E402
from hopformer.train.build import build_model  # noqa: E402
from hopformer.train.config import load_config  # noqa: E402
from hopformer.train.evaluation import objective_loss  # noqa: E402
from hopformer.train.optim import make_optimizer  # noqa: E402


def measure(config_path: str, attention: str, steps: int, warmup: int, device: torch.device) -> dict:
    config = load_config(config_path, {"model.attention": attention})
    torch.manual_seed(0)
    model = build_model(config, None).to(device)
    optimizer = make_optimizer(model, config)
    batch, length = config.train.batch_size, config.data.max_length
    windows = torch.randint(0, 256, (batch, length + 1), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            loss, _, _ = objective_loss(model(windows[:, :-1]).float(), windows[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    began = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - began) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"attention": attention, "ms_per_step": 1e3 * seconds, "tokens_per_s": batch * length / seconds,
            "peak_memory_mib": peak}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/bytes_4k.yaml", help="the training config whose model runs")
    parser.add_argument("--attentions", default="full,bigbird,diffuser,routing,combiner,hypercube")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, caches)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="lm_step.json", help="the JSON written")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for attention in args.attentions.split(","):
        try:
            rows.append(measure(args.config, attention, args.steps, args.warmup, device))
        except (RuntimeError, ValueError, torch.OutOfMemoryError) as error:
            rows.append({"attention": attention, "error": f"{type(error).__name__}: {str(error).splitlines()[0]}"})
        print(json.dumps(rows[-1]), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    record = {"command": command_line(), "environment": environment(device), "config": args.config, "rows": rows}
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
