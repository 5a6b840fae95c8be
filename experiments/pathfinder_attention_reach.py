"""How far does a trained model's attention reach on Pathfinder images? Bigbird against Diffuser.

Pathfinder asks whether two markers lie on one curve, which a model can only answer by following the
curve pixel by pixel. Bigbird learns the task faster and better than Diffuser on the same graph budget
(docs/lra.md, eighth and ninth rounds). This measures where each trained layer actually sends its
attention. For every layer and head it builds the operator that mixes the values, on test images,
exactly as the model computes it (``hopformer.analysis.attention_operators``):
- bigbird: one hop, ``A``, the softmax of the query-key scores on the graph;
- Diffuser: ``A`` and the diffused operator ``sum_k c_k A^k`` (its ``hops``, ``alpha`` and remainder).
Also the same graphs with uniform weights (an untrained model's operator) for reference.

    python experiments/pathfinder_attention_reach.py --data-dir data/lra_release \
        --run runs/conv/bigbird-conv-lr3e-4 --run runs/conv/diffuser-conv-lr3e-4 \
        --out /tmp/attention_reach_cpu.json

(The records of benchmarks/results/pathfinder_variants_h200 and pathfinder_all_attentions_h200 came from it;
they are kept in those studies' summary.json.)

Reported per layer and head, as means over query pixels (all pixels, and the lit "ink" pixels alone):
``distance``, the expected pixel distance from a query to what it attends to; ``local3`` and ``local7``,
the weight on its 3 x 3 and 7 x 7 neighbourhoods; ``self``, the weight on itself; ``on_ink``, the weight on
lit pixels; ``keys``, the effective number of keys attended to (the exponential of the row's entropy).
The fraction of lit pixels in the images is reported beside them (``ink_fraction``). A run trained with
``data.mask_black_pixels=true`` is analysed with that mask, as it ran.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hopformer.analysis import attention_operators  # noqa: E402
from hopformer.attention import use_portable_backends  # noqa: E402
from hopformer.bench.harness import command_line, environment, positive_int  # noqa: E402
from hopformer.data import load_lra  # noqa: E402
from hopformer.models import from_pretrained  # noqa: E402
from hopformer.train.config import load_config  # noqa: E402


def pixel_geometry(side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean and Chebyshev distances between the pixels of a ``side`` x ``side`` image, raster order."""
    rows, cols = torch.div(torch.arange(side * side), side, rounding_mode="floor"), torch.arange(side * side) % side
    dr, dc = (rows[:, None] - rows[None, :]).abs().double(), (cols[:, None] - cols[None, :]).abs().double()
    return (dr**2 + dc**2).sqrt(), torch.maximum(dr, dc)


def reach(operator: torch.Tensor, ink: torch.Tensor, side: int) -> dict[str, torch.Tensor]:
    """The reach measures (module docstring) of ``operator`` ``(batch, heads, L, L)``, each ``(batch, heads, L)``."""
    euclid, cheb = pixel_geometry(side)
    return {
        "distance": (operator * euclid).sum(-1),
        "local3": (operator * (cheb <= 1)).sum(-1),
        "local7": (operator * (cheb <= 3)).sum(-1),
        "self": operator.diagonal(dim1=-2, dim2=-1),
        "on_ink": (operator * ink[:, None, None, :]).sum(-1),
        "keys": torch.exp(-(operator * operator.clamp_min(1e-300).log()).sum(-1)),
    }


def masks_black_pixels(run: Path) -> bool:
    """Whether the run trained with ``data.mask_black_pixels`` (attention over the lit pixels only)."""
    return load_config(run / "config.yaml").data.mask_black_pixels


def lit_mask(masked: bool, ids: torch.Tensor) -> torch.Tensor | None:
    """The attention mask a run trained with: the lit pixels if it ``masked`` the black ones, else None."""
    return ids > 0 if masked else None


def load_on_cpu(run: Path) -> torch.nn.Module:
    """The run's best checkpoint in eval mode; a CUDA-only backend it trained with (``triton``, ``flex``)
    becomes ``auto``, which computes the same operator on the CPU."""
    model = from_pretrained(run / "best").eval()
    use_portable_backends(model)
    return model


def analyse(run: Path, images: torch.Tensor, batch_size: int) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Reach of every layer's operators of the run's best checkpoint over ``images`` (ids, raster order):
    ``{"layer0 A": {"distance": {"all": [per head], "ink": [per head]}, ...}, ...}``. For a run that masked
    the black pixels, their queries have no operator rows, so only the ``ink`` means are given."""
    model = load_on_cpu(run)
    masked = masks_black_pixels(run)
    side = round(images.shape[1] ** 0.5)
    measured: dict[str, dict[str, list[torch.Tensor]]] = {}
    for start in range(0, len(images), batch_size):
        ids = images[start : start + batch_size]
        for uniform in (False, True):
            for layer, found in enumerate(attention_operators(model, ids, lit_mask(masked, ids), uniform=uniform)):
                for name, operator in found.items():
                    key = f"layer{layer} {name}" + (", uniform" if uniform else "")
                    for measure, values in reach(operator, ids > 0, side).items():
                        measured.setdefault(key, {}).setdefault(measure, []).append(values)
    ink = (images > 0)[:, None, :].double()  # (images, 1, L)
    return {
        key: {
            measure: {
                "all": None if masked else torch.cat(parts).mean((0, 2)).tolist(),
                "ink": ((torch.cat(parts) * ink).sum((0, 2)) / ink.sum((0, 2))).tolist(),
            }
            for measure, parts in measures.items()
        }
        for key, measures in measured.items()
    }


def figure(runs: list[str], image: torch.Tensor, path: str) -> None:
    """Where one lit pixel's query goes in layer 0 of each run, as heat maps over the image (mean of the
    heads, log scale): the image with the query marked, then each run's ``A`` (and diffused operator)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    side = round(image.numel() ** 0.5)
    lit = (image > 0).nonzero().flatten()
    rows, cols = torch.div(lit, side, rounding_mode="floor"), lit % side
    query = int(lit[((rows - side / 2) ** 2 + (cols - side / 2) ** 2).argmin()])  # the lit pixel nearest the centre
    panels = [("image, query marked", image.double().view(side, side) / 255.0, None)]
    for run in runs:
        model, mask = load_on_cpu(Path(run)), lit_mask(masks_black_pixels(Path(run)), image[None])
        for name, operator in attention_operators(model, image[None], mask)[0].items():
            weights = operator[0, :, query].mean(0).view(side, side)
            panels.append((f"{Path(run).name}\nlayer 0 {name}", weights, LogNorm(1e-4, 1.0)))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for ax, (title, values, norm) in zip(axes, panels):
        shown = ax.imshow(
            values.clamp_min(1e-4) if norm else values, cmap="gray" if norm is None else "magma", norm=norm
        )
        ax.plot(query % side, query // side, "c+", markersize=12, markeredgewidth=2)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        if norm is not None:
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True, help="folder holding pathfinder32/")
    parser.add_argument("--run", action="append", required=True, help="run folder with a best/ checkpoint")
    parser.add_argument("--images", type=positive_int, default=16, help="test images to average over")
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--figure", help="also draw where one lit pixel of the first image attends (PNG)")
    args = parser.parse_args(argv)
    for run in args.run:
        if not (Path(run) / "best").is_dir():
            parser.error(f"--run {run}: no best/ checkpoint there")

    test = load_lra("pathfinder32", args.data_dir, "test")[: args.images]
    images = torch.stack([example["input_ids"] for example in test]).long()
    results = {}
    for run in args.run:
        results[run] = analyse(Path(run), images, args.batch_size)
        for key, slot in results[run].items():
            summary = ", ".join(f"{m} {' / '.join(f'{v:.3f}' for v in slot[m]['ink'])}" for m in slot)
            print(f"{Path(run).name} {key} (ink queries, per head): {summary}", flush=True)
    report = {
        "command": command_line(argv),
        "environment": environment(torch.device("cpu")),
        "settings": vars(args),
        "ink_fraction": (images > 0).double().mean().item(),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    if args.figure:
        figure(args.run, images[0], args.figure)


if __name__ == "__main__":
    main()
