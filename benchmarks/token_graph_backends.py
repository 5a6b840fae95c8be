"""`diffuse` on token-level graphs: `matrix` against `flex`, by length and hops (CUDA).

The Triton kernels need 16-token tiles, so a token-level graph (the paper's token-random Diffuser graph)
diffuses on `matrix` (the attention materialised once, reused by every hop) or `flex` (scores recomputed
every hop, never materialised). This measures where each wins; `hopformer.ops.sparse.FLEX_AUTO_MAX_HOPS`
comes from it. Forward+backward in bf16, the tokens per call held fixed (batch = tokens // length), a
random half of the keys padded, mean of 10 calls after 3 warm-up calls.

    python benchmarks/token_graph_backends.py --out benchmarks/results/diffusion_token_graph_crossover_h200.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from hopformer.bench.harness import command_line, environment, write_json
from hopformer.graphs import diffuser
from hopformer.ops import diffuse


def time_ms(graph, batch: int, heads: int, head_dim: int, hops: int, backend: str, repeats: int = 10) -> float:
    """Mean milliseconds of one forward+backward of ``diffuse`` on fresh bf16 inputs."""
    seq = graph.seq_len
    mask = torch.rand(batch, seq, device="cuda") < 0.5
    q, k, v = (
        torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )

    def step() -> None:
        out = diffuse(q, k, v, graph, hops=hops, key_padding_mask=mask, backend=backend)
        out.float().square().mean().backward()

    for _ in range(3):  # warm-up: compiles flex's kernels
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000 / repeats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", default="256,512,1024,2048")
    parser.add_argument("--hops", default="1,2,5,10")
    parser.add_argument("--tokens", type=int, default=256 * 1024, help="tokens per call (batch = tokens // length)")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--out", type=Path, help="JSON file to write")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("token_graph_backends.py needs CUDA (flex runs on CUDA only); nothing measured", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    rows = []
    for seq in (int(n) for n in args.seq_lens.split(",")):
        graph = diffuser(seq, 32, num_global=1, num_random=1, random_granularity="token")
        for hops in (int(h) for h in args.hops.split(",")):
            row = {"seq_len": seq, "batch": args.tokens // seq, "hops": hops}
            for backend in ("matrix", "flex"):
                row[f"{backend}_ms"] = round(time_ms(graph, row["batch"], args.heads, args.head_dim, hops, backend), 3)
            row["flex_over_matrix"] = round(row["flex_ms"] / row["matrix_ms"], 3)
            print(row, flush=True)
            rows.append(row)
    result = {
        "command": command_line(argv),
        "environment": environment(torch.device("cuda")),
        "settings": {"heads": args.heads, "head_dim": args.head_dim, "dtype": "bfloat16", "key_padding": "random half"},
        "rows": rows,
    }
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
