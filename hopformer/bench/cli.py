"""``hopformer bench``: time and memory of dense SDPA, sparse_attention and diffuse per backend."""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from hopformer.bench.harness import Case, environment, plot, run_grid


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--seq-lens", default="1024,2048,4096", help="comma-separated sequence lengths")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--pattern", default="bigbird")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--window", type=int, default=3)
    parser.add_argument("--num-global", type=int, default=2)
    parser.add_argument("--num-random", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hops", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--ops", default="sdpa,sparse,diffuse", help="any of sdpa, sparse, diffuse")
    parser.add_argument("--backends", default=None, help="gather,flex,dense (default: gather on CPU, flex on CUDA)")
    parser.add_argument("--modes", default="fwd,fwd+bwd")
    parser.add_argument("--sdpa-max-len", type=int, default=None, help="skip dense SDPA above this length")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--out", default="benchmarks/results/attention.json", help="JSON file (a PNG is written beside it)"
    )


def run(args: argparse.Namespace) -> int:
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    backends = (args.backends or ("flex" if device.type == "cuda" else "gather")).split(",")
    settings = {
        "dtype": dtype,
        "batch": args.batch,
        "heads": args.heads,
        "head_dim": args.head_dim,
        "pattern": args.pattern,
        "hops": args.hops,
        "alpha": args.alpha,
        "graph_options": _graph_options(args),
    }
    cases = []
    for seq_len in (int(x) for x in args.seq_lens.split(",")):
        for mode in args.modes.split(","):
            for op in args.ops.split(","):
                if op == "sdpa":
                    if args.sdpa_max_len is None or seq_len <= args.sdpa_max_len:
                        cases.append(Case("sdpa", "sdpa", seq_len, mode))
                    continue
                if op not in ("sparse", "diffuse"):
                    raise SystemExit(f"--ops: unknown op {op!r}; choose from sdpa, sparse, diffuse")
                cases.extend(Case(op, backend, seq_len, mode) for backend in backends)

    def show(row: dict) -> None:
        result = f"{row['ms']:10.2f} ms  {row['peak_mib']:9.1f} MiB" if "ms" in row else row["error"]
        print(f"{row['op']:8s} {row['backend']:7s} {row['mode']:8s} L={row['seq_len']:<8d} {result}", flush=True)

    rows = run_grid(cases, settings, device, args.repeats, args.warmup, show)
    result = {"environment": environment(device), "settings": settings, "rows": rows, "ratios": _ratios(rows)}
    for line in result["ratios"]:
        print(line)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    _write_atomic(args.out, json.dumps(result, indent=1))
    png = os.path.splitext(args.out)[0] + ".png"
    try:
        plot(result, png)
        print(f"wrote {args.out} and {png}")
    except ImportError:
        print(f"wrote {args.out} (install matplotlib for the plot)")
    return 0


def _graph_options(args: argparse.Namespace) -> dict:
    options = {"block_size": args.block_size}
    if args.pattern in ("local", "longformer", "bigbird", "diffuser"):
        options["window"] = args.window
    if args.pattern in ("longformer", "bigbird", "diffuser"):
        options["num_global"] = args.num_global
    if args.pattern in ("bigbird", "diffuser"):
        options.update(num_random=args.num_random, seed=args.seed)
    return options


def _ratios(rows: list[dict]) -> list[str]:
    """Each op's time and memory over dense SDPA's, side by side from the same run."""
    index = {(r["op"], r["backend"], r["mode"], r["seq_len"]): r for r in rows if "ms" in r}
    lines = []
    for (op, backend, mode, seq_len), row in sorted(index.items(), key=lambda item: (item[0][3], item[0][2])):
        dense = index.get(("sdpa", "sdpa", mode, seq_len))
        if op == "sdpa" or dense is None:
            continue
        lines.append(
            f"L={seq_len} {mode}: {op}[{backend}] / dense SDPA = {row['ms'] / dense['ms']:.2f}x time, "
            f"{row['peak_mib'] / max(dense['peak_mib'], 1e-9):.2f}x memory"
        )
    return lines


def _write_atomic(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as handle:
        handle.write(text)
    os.replace(handle.name, path)
