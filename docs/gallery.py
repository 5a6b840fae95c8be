"""Draw every attention pattern as a dense token mask: the pictures in ``docs/attentions.md``.

Run from the repository root (needs matplotlib)::

    python docs/gallery.py            # writes docs/figures/patterns/<name>.png

Each picture is ``graph.to_dense()`` (row = query, column = key, black = attended), titled with the
call that built it. ``GALLERY`` is the list the docs page shows; ``tests/test_docs.py`` checks that
the page quotes every call and shows every picture.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from hopformer.graphs import bigbird, diffuser, full, grid2d, hypercube, local, longformer  # noqa: F401

OUT = Path(__file__).resolve().parent / "figures" / "patterns"

# (file name, the call that builds the graph). 256 tokens in blocks of 16: 16 x 16 blocks, small PNGs.
GALLERY: list[tuple[str, str]] = [
    ("full", "full(256, 16)"),
    ("local", "local(256, 16, window=3)"),
    ("longformer", "longformer(256, 16, window=3, num_global=1)"),
    ("bigbird", "bigbird(256, 16, window=3, num_global=2, num_random=3, seed=0)"),
    ("diffuser", "diffuser(256, 16, window=3, num_global=2, num_random=3, seed=0)"),
    ("diffuser_token", 'diffuser(256, 16, num_global=2, num_random=1, random_granularity="token", seed=0)'),
    ("hypercube", "hypercube(256, 16)"),
    ("grid2d", "grid2d(256, radius=1)"),
    ("grid2d_random", "grid2d(256, radius=1, num_random=2, seed=0)"),
    ("local_causal", "local(256, 16, window=3, causal=True)"),
    ("bigbird_causal", "bigbird(256, 16, seed=0, causal=True)"),
    ("union", "local(256, 16, window=3) | hypercube(256, 16)"),
    ("intersection", "bigbird(256, 16, seed=0) & local(256, 16, window=7)"),
]


def draw(name: str, call: str, out: Path = OUT) -> Path:
    """Build the graph of ``call`` and save its dense mask as ``out/<name>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    graph = eval(call)  # the calls above, written once so the page can quote them exactly
    figure, ax = plt.subplots(figsize=(3.2, 3.4), dpi=80)
    ax.imshow(graph.to_dense().numpy(), cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
    title = textwrap.fill(call, 40, break_on_hyphens=False)
    ax.set_title(f"{title}\ndensity {graph.density:.3f}", fontsize=7)
    ax.set_xlabel("key", fontsize=7)
    ax.set_ylabel("query", fontsize=7)
    ax.tick_params(labelsize=6)
    figure.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    figure.savefig(path)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the PNGs (default: %(default)s)")
    args = parser.parse_args()
    for name, call in GALLERY:
        print(draw(name, call, args.out))


if __name__ == "__main__":
    main()
