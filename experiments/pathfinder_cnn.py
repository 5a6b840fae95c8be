"""Is a Pathfinder folder learnable at all? A small dilated CNN as a locality-first probe.

Every transformer recipe tried on generated Pathfinder-32 memorised its training images without
learning the rule (docs/lra.md). This probe asks the data question apart from attention: a CNN has
the locality prior built in, so if it learns the rule from the same 160,000 training images, the
images carry it and the transformers' failure is one of optimisation or inductive bias.

    python experiments/pathfinder_cnn.py --data-dir data/lra_release --epochs 4 --out /tmp/cnn.json

(The records of benchmarks/results/pathfinder_cnn_cpu came from it; they are kept in its summary.json.)

Model: ``depth`` 3x3 convolutions of ``channels`` channels (BatchNorm, ReLU) at full resolution with
dilations 1, 1, 2, 4, 8, 1, 2, 4, ... (a receptive field over the whole 32x32 image; ``--max-dilation``
caps them, e.g. 1 for a plain stack whose receptive field is ``2 * depth + 1`` pixels), global average
and max pooling, a linear head. AdamW, one-cycle schedule. Pixels are scaled to [0, 1] (``--inputs table``:
looked up in a learned 256-entry table instead, as a transformer's token embedding sees them). Validation
after every epoch; test on the best-validation weights. Writes JSON with the command, environment,
settings and per-epoch metrics (after every epoch, so an interrupted run keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hopformer.bench.harness import command_line, environment, positive_int  # noqa: E402
from hopformer.data import load_lra  # noqa: E402


class DilatedCNN(nn.Module):
    """``depth`` same-size 3x3 convolutions with growing dilations, then global pooling and a linear head."""

    def __init__(
        self, channels: int = 16, depth: int = 8, classes: int = 2, max_dilation: int = 8, inputs: str = "intensity"
    ) -> None:
        super().__init__()
        # "table": one learned vector per pixel value (as the transformers' token embedding), not the intensity
        self.table = nn.Embedding(256, channels) if inputs == "table" else None
        dilations = [min(d, max_dilation) for d in [1, 1] + [2 ** (i % 4) for i in range(1, depth - 1)]]
        layers: list[nn.Module] = []
        width = channels if self.table is not None else 1
        for dilation in dilations:
            layers += [
                nn.Conv2d(width, channels, 3, padding=dilation, dilation=dilation, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            ]
            width = channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * channels, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.table is not None:
            images = self.table((images * 255).round().long().squeeze(1)).permute(0, 3, 1, 2)
        x = self.features(images)
        return self.head(torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1))


def tensors(examples: list[dict], side: int) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = torch.stack([e["input_ids"] for e in examples]).view(-1, 1, side, side).float() / 255.0
    labels = torch.tensor([e["label"] for e in examples])
    return pixels, labels


@torch.no_grad()
def evaluate(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, batch: int) -> tuple[float, float]:
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(labels), batch):
        logits = model(pixels[start : start + batch])
        target = labels[start : start + batch]
        loss += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(-1) == target).sum().item()
    return loss / len(labels), correct / len(labels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="root holding pathfinder32/<difficulty>/")
    parser.add_argument("--difficulty", default="curv_contour_length_14")
    parser.add_argument("--epochs", type=positive_int, default=4)
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--channels", type=positive_int, default=16)
    parser.add_argument("--depth", type=positive_int, default=8)
    parser.add_argument(
        "--max-dilation", type=positive_int, default=8, help="cap on the dilations (1: plain 3x3 convolutions)"
    )
    parser.add_argument(
        "--inputs",
        choices=["intensity", "table"],
        default="intensity",
        help="pixels as scaled intensities, or through a 256-entry embedding table as the transformers see them",
    )
    parser.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.depth < 2:
        parser.error(f"--depth must be at least 2, got {args.depth}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    splits = {
        s: load_lra("pathfinder32", args.data_dir, s, difficulty=args.difficulty) for s in ("train", "val", "test")
    }
    if args.train_limit:
        splits["train"] = splits["train"][: args.train_limit]
    data = {s: tensors(examples, 32) for s, examples in splits.items()}
    model = DilatedCNN(args.channels, args.depth, max_dilation=args.max_dilation, inputs=args.inputs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = -(-len(data["train"][1]) // args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.epochs * steps_per_epoch)

    record = {
        "command": command_line(argv),
        "environment": environment(torch.device("cpu")),
        "settings": {
            **vars(args),
            "train_images": len(data["train"][1]),
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "epochs": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    best_val, best_state = -1.0, None
    for epoch in range(1, args.epochs + 1):
        model.train()
        started = time.perf_counter()
        order = torch.randperm(len(data["train"][1]))
        train_loss, train_correct = 0.0, 0
        for start in range(0, len(order), args.batch_size):
            index = order[start : start + args.batch_size]
            logits = model(data["train"][0][index])
            loss = nn.functional.cross_entropy(logits, data["train"][1][index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            train_loss += loss.item() * len(index)
            train_correct += (logits.argmax(-1) == data["train"][1][index]).sum().item()
        val_loss, val_accuracy = evaluate(model, *data["val"], 512)
        row = {
            "epoch": epoch,
            "train_loss": train_loss / len(order),
            "train_accuracy": train_correct / len(order),
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            "seconds": time.perf_counter() - started,
        }
        record["epochs"].append(row)
        print(json.dumps(row), flush=True)
        if val_accuracy > best_val:
            best_val, best_state = val_accuracy, {k: v.clone() for k, v in model.state_dict().items()}
        out.write_text(json.dumps(record, indent=1))
    model.load_state_dict(best_state)
    record["test_loss"], record["test_accuracy"] = evaluate(model, *data["test"], 512)
    record["best_val_accuracy"] = best_val
    out.write_text(json.dumps(record, indent=1))
    print(f"best val accuracy {best_val:.4f}; test accuracy {record['test_accuracy']:.4f}; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
