"""Does Diffuser start Pathfinder with weaker gradients than bigbird? A diagnostic at initialisation.

On Pathfinder-32 with the conv recipe, Diffuser learns more slowly than bigbird in every setting tried
(docs/lra.md, ninth round). One explanation would be that diffusion attenuates the gradient reaching the
queries and keys at the start: at initialisation attention is near uniform, and the diffused operator
averages over even more tokens. This measures it, on CPU, in float32, in evaluation mode (no dropout):

    python experiments/pathfinder_grad_at_init.py --data-dir data/lra_release --out /tmp/grad_at_init_cpu.json

(The record of benchmarks/results/pathfinder_variants_h200 came from it; it is kept in that study's summary.json.)

The model is the conv recipe's (`configs/lra/pathfinder32_pytorch_conv.yaml`: dim 64, 2 layers, 2 heads,
3 x 3 conv stem, PyTorch init, mean pooling). For every attention setting and seed, one batch of random
training images, one backward pass of the classification loss. Reported, as means over seeds:
- the gradient norms of each layer's query, key and value projections and its output projection;
- ``token_spread``: how much the attention output varies over the tokens of an image, as
  ||o - mean over tokens|| / ||o||. 0 means every token gets the same vector.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hopformer.bench.harness import command_line, environment, positive_int  # noqa: E402
from hopformer.data import load_lra  # noqa: E402
from hopformer.models import EncoderConfig, SequenceClassifier, TransformerEncoder  # noqa: E402

SETTINGS = {  # name: (attention, options)
    "bigbird": ("bigbird", {}),
    "diffuser": ("diffuser", {}),
    "diffuser alpha=0.5": ("diffuser", {"alpha": 0.5}),
    "diffuser hops=2": ("diffuser", {"hops": 2}),
    "diffuser hops=1 (one hop of attention)": ("diffuser", {"hops": 1, "alpha": 1e-6}),
}


def measure(attention: str, options: dict, ids: torch.Tensor, labels: torch.Tensor, seed: int) -> dict[str, float]:
    """Gradient norms and token spread of one freshly initialised model on one batch."""
    torch.manual_seed(seed)
    encoder = TransformerEncoder(EncoderConfig(
        256, dim=64, depth=2, heads=2, mlp_dim=128, max_len=ids.shape[1], attention=attention,
        attention_options=options, pad_id=None, init="torch", embedding="conv",
    ))  # fmt: skip
    model = SequenceClassifier(encoder, 2, pooling="mean").eval()
    outputs = []
    hooks = [block.attention.register_forward_hook(lambda m, i, o: outputs.append(o)) for block in encoder.blocks]
    F.cross_entropy(model(ids), labels).backward()
    for hook in hooks:
        hook.remove()
    row = {}
    for layer, block in enumerate(encoder.blocks):
        dim = block.attention.out.weight.shape[0]
        for part, grad in zip("qkv", block.attention.qkv.weight.grad.view(3, dim, dim)):
            row[f"layer{layer}.{part}_grad"] = grad.norm().item()
        row[f"layer{layer}.out_grad"] = block.attention.out.weight.grad.norm().item()
        out = outputs[layer].detach()
        row[f"layer{layer}.token_spread"] = ((out - out.mean(1, keepdim=True)).norm() / out.norm()).item()
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True, help="folder holding pathfinder32/")
    parser.add_argument("--seeds", type=positive_int, default=3, help="models (and batches) per setting")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)

    train = load_lra("pathfinder32", args.data_dir, "train")
    results = {}
    for name, (attention, options) in SETTINGS.items():
        rows = []
        for seed in range(args.seeds):
            picks = np.random.default_rng(seed).choice(len(train), args.batch_size, replace=False)
            ids = torch.stack([train[i]["input_ids"] for i in picks]).long()
            labels = torch.tensor([int(train[i]["label"]) for i in picks])
            rows.append(measure(attention, options, ids, labels, seed))
        results[name] = {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}
        print(name, {key: round(value, 5) for key, value in results[name].items()}, flush=True)
    report = {
        "command": command_line(argv),
        "environment": environment(torch.device("cpu")),
        "settings": vars(args),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
