"""FlexAttention kernel tiles: hopformer's tuned options against Inductor's defaults, by shape (CUDA only).

``hopformer.ops.flex.TUNED_KERNEL_OPTIONS`` (half-height query tiles) were measured on one 131K-token
sequence, 12 heads x 64. This script times ``sparse_attention(backend="flex")`` with them and with
Inductor's defaults over a spread of lengths at a fixed token count (batch x length), two head shapes,
with and without key padding, so that :func:`hopformer.ops.flex.default_kernel_options` applies the tuned
tiles only where they win. Padding ``lit`` keeps each token with probability 0.22 (the lit pixels of a
Pathfinder image: every tile partial); ``none`` has no key padding mask.

    python benchmarks/flex_tiles.py --out benchmarks/results/flex_tiles_h200.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hopformer.bench.harness import command_line, cuda_times_ms, environment, write_json  # noqa: E402
from hopformer.graphs import build_graph  # noqa: E402
from hopformer.ops import flex as flex_backend  # noqa: E402
from hopformer.ops.sparse import sparse_attention  # noqa: E402

TILES = {"tuned": dict(flex_backend.TUNED_KERNEL_OPTIONS), "inductor": {}}  # {}: Inductor's defaults


def time_ms(fn, repeats: int, warmup: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` calls, after ``warmup`` (compilation) calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = cuda_times_ms(fn, repeats)
    return sorted(times)[len(times) // 2]


def measure(seq: int, batch: int, heads: int, head_dim: int, padding: str, tiles: str, args) -> dict:
    """Forward and forward+backward milliseconds of bigbird attention at one shape and tile setting."""
    graph = build_graph("bigbird", seq, block_size=args.block_size)
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(
            batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, generator=generator
        ).requires_grad_()
        for _ in range(3)
    )
    mask = None
    if padding == "lit":
        mask = torch.rand(batch, seq, device="cuda", generator=generator) < 0.22
        mask[:, 0] = True  # every sequence keeps a real token
    options = TILES[tiles]

    def forward():
        with torch.no_grad():
            sparse_attention(q, k, v, graph, mask, backend="flex", kernel_options=options)

    def forward_backward():
        out = sparse_attention(q, k, v, graph, mask, backend="flex", kernel_options=options)
        out.backward(torch.ones_like(out))

    return {
        "seq": seq, "batch": batch, "heads": heads, "head_dim": head_dim, "padding": padding, "tiles": tiles,
        "fwd_ms": round(time_ms(forward, args.repeats, args.warmup), 4),
        "fwd_bwd_ms": round(time_ms(forward_backward, args.repeats, args.warmup), 4),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=262_144, help="batch x length of every shape")
    parser.add_argument("--seq-lens", default="1024,4096,16384,65536,131072")
    parser.add_argument("--head-shapes", default="2x32,12x64", help="heads x head_dim, comma-separated")
    parser.add_argument("--paddings", default="none,lit")
    parser.add_argument("--block-size", type=int, default=64, help="bigbird block size")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/flex_tiles.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("flex_tiles.py needs CUDA (FlexAttention's compiled kernels); nothing measured", file=sys.stderr)
        return 1
    rows = []
    for seq in (int(s) for s in args.seq_lens.split(",")):
        batch = max(1, args.tokens // seq)
        for shape in args.head_shapes.split(","):
            heads, head_dim = (int(x) for x in shape.split("x"))
            for padding in args.paddings.split(","):
                pair = {}
                for tiles in TILES:
                    began = time.perf_counter()
                    row = measure(seq, batch, heads, head_dim, padding, tiles, args)
                    row["wall_s"] = round(time.perf_counter() - began, 1)
                    rows.append(row)
                    pair[tiles] = row
                    torch._dynamo.reset()  # a fresh compile cache per setting: no recompile limit across rows
                ratio = pair["tuned"]["fwd_bwd_ms"] / pair["inductor"]["fwd_bwd_ms"]
                print(
                    f"L={seq:>6} B={batch:>3} {heads:>2}x{head_dim} pad={padding:<4} "
                    f"fwd {pair['tuned']['fwd_ms']:.3f}/{pair['inductor']['fwd_ms']:.3f} ms "
                    f"fwd+bwd {pair['tuned']['fwd_bwd_ms']:.3f}/{pair['inductor']['fwd_bwd_ms']:.3f} ms "
                    f"(tuned/inductor {ratio:.2f})",
                    flush=True,
                )
    result = {
        "command": command_line(argv),
        "environment": environment(torch.device("cuda")),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "tuned_options": TILES["tuned"],
        "rows": rows,
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
