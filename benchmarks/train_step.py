"""Time and peak memory of one training step of a whole classifier, per attention, side by side.

One step is what ``hopformer train`` runs: forward under bf16 autocast (CUDA), cross-entropy,
backward, AdamW. Every variant gets the same batches (token ids, padding masks, labels; the same
seed), so the ratios compare attentions, not data. Times are medians over ``--steps`` steps after
``--warmup`` (compiling FlexAttention kernels happens in the warm-up); memory is CUDA
``max_memory_allocated`` over the timed steps (on CPU: not measured).

    python benchmarks/train_step.py --out benchmarks/results/train_step_listops.json --seq-len 2048 \\
        --variant full --variant bigbird --variant diffuser:backend=matrix --variant diffuser:backend=flex

A variant is ``ATTENTION[:key=value,...]`` (the options of ``--attention-option``). The default model
is the LRA ListOps one (4 layers, dim 512, 8 heads, MLP 1024, CLS pooling) at batch 32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hopformer.bench.harness import command_line, environment
from hopformer.models import EncoderConfig, SequenceClassifier, TransformerEncoder
from hopformer.train.config import parse_assignment


def parse_variant(text: str) -> tuple[str, dict]:
    """``diffuser:backend=gather,hops=3`` -> ("diffuser", {"backend": "gather", "hops": 3})."""
    name, _, rest = text.partition(":")
    options = dict(parse_assignment(item) for item in rest.split(",") if item)
    return name, options


def make_batches(args, count: int, device: torch.device) -> list[tuple]:
    """``count`` batches whose attention sees ``--seq-len`` positions (with CLS pooling one of them is
    the CLS vector); each example's real length is uniform in ``[min_fraction, 1]`` of the tokens,
    the rest padding, as in length-bucketed batches."""
    generator = torch.Generator().manual_seed(0)
    tokens = args.seq_len - (args.pooling == "cls")
    batches = []
    for _ in range(count):
        ids = torch.randint(1, args.vocab, (args.batch, tokens), generator=generator)
        low = int(args.min_fraction * tokens)
        lengths = torch.randint(low, tokens + 1, (args.batch,), generator=generator)
        mask = torch.arange(tokens)[None, :] < lengths[:, None]
        labels = torch.randint(0, args.classes, (args.batch,), generator=generator)
        batches.append((ids.masked_fill(~mask, 0).to(device), mask.to(device), labels.to(device)))
    return batches


def measure(name: str, options: dict, args, batches, device: torch.device) -> dict:
    torch.manual_seed(0)
    encoder = TransformerEncoder(EncoderConfig(
        vocab_size=args.vocab, dim=args.dim, depth=args.depth, heads=args.heads, mlp_dim=args.mlp_dim,
        max_len=args.seq_len, attention=name, attention_options=options, norm="pre",
        positions="learned", dropout=0.1, pad_id=0, pad_to_multiple=1,
    ))  # fmt: skip
    model = SequenceClassifier(encoder, args.classes, pooling=args.pooling).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(batch):
        ids, mask, labels = batch
        with autocast:
            loss = F.cross_entropy(model(ids, mask).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    began = time.perf_counter()
    for batch in batches[: args.warmup]:
        step(batch)
    sync()
    warmup_s = time.perf_counter() - began
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for batch in batches[args.warmup :]:
        sync()
        began = time.perf_counter()
        loss = step(batch)
        sync()
        times.append(time.perf_counter() - began)
    row = {
        "attention": name,
        "options": options,
        "ms_per_step": 1e3 * statistics.median(times),
        "ms_min": 1e3 * min(times),
        "warmup_s": warmup_s,
        "final_loss": float(loss.detach()),
        "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", action="append", required=True, help="ATTENTION[:key=value,...]; repeat")
    parser.add_argument("--seq-len", type=int, default=2048, help="positions the attention sees (CLS included)")
    parser.add_argument("--min-fraction", type=float, default=0.5, help="shortest real length / seq-len")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--mlp-dim", type=int, default=1024)
    parser.add_argument("--pooling", choices=("cls", "mean"), default="cls")
    parser.add_argument("--vocab", type=int, default=20)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="JSON file to write")
    args = parser.parse_args(argv)
    if not 0 < args.min_fraction <= 1:
        parser.error(f"--min-fraction must be in (0, 1], got {args.min_fraction}")
    device = torch.device(args.device)
    batches = make_batches(args, args.warmup + args.steps, device)
    rows = []
    for text in args.variant:
        name, options = parse_variant(text)
        rows.append(measure(name, options, args, batches, device))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the variant's model and optimizer are gone with measure()
        print(f"{text:40s} {rows[-1]['ms_per_step']:8.1f} ms/step  peak {rows[-1]['peak_memory_mib'] or 0:8.0f} MiB")
    base = rows[0]
    for row in rows:
        row["time_ratio"] = row["ms_per_step"] / base["ms_per_step"]
        if base["peak_memory_mib"]:
            row["memory_ratio"] = row["peak_memory_mib"] / base["peak_memory_mib"]
    result = {
        "command": command_line(argv),
        "environment": environment(device),
        "settings": {k: v for k, v in vars(args).items() if k not in ("variant", "out")},
        "ratios_against": args.variant[0],
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
