"""CPU: ``diffuse`` (gather backend) against one dense masked SDPA, forward+backward, interleaved in one process.

The question of issue 42, part 3: at 4K tokens, float32, 8 heads x 64, 2 threads, on the README's CPU graph
(bigbird: block 64, window 3, 2 global, 3 random), does ``diffuse`` with 5 hops take at most half the time
and half the extra memory of one dense SDPA with the graph's boolean mask?

Unlike ``hopformer bench`` (one case after another), every round here runs one step of each op back to back
(SDPA, then each gather implementation), so a burst of load from other jobs on a shared machine hits all of
them alike; the ratios are medians over rounds of the per-round ratios. ``--before REV`` adds the gather
backend of git revision ``REV`` (loaded from ``git show``) as a third op, so before and after run side by
side. Memory: the peak resident set size above the inputs during one extra step of each op, sampled as
``hopformer bench`` does (``hopformer.bench.harness``).

    python benchmarks/cpu_diffuse_ratio.py --threads 2 --rounds 15 --before main --out summary.json
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hopformer.bench.harness import _malloc_mode, _PeakRSS, command_line, environment, write_json
from hopformer.graphs import build_graph
from hopformer.ops import diffuse
from hopformer.ops.coefficients import diffusion_coefficients, mixing_weights


def load_gather(rev: str):
    """The ``gather`` backend module of git revision ``rev`` (its ``gather_diffusion``)."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(
        ["git", "show", f"{rev}:hopformer/ops/gather.py"], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    name = f"hopformer_gather_at_{rev}".replace("-", "_").replace(".", "_")
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:hopformer/ops/gather.py", "exec"), module.__dict__)  # noqa: S102
    return module


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--hops", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--before", default=None, help="git revision whose gather backend also runs")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    graph = build_graph("bigbird", args.seq_len, block_size=64, window=3, num_global=2, num_random=3, seed=0)
    shape = (1, args.heads, args.seq_len, args.head_dim)
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape)
    mask = graph.to_dense()
    scale = args.head_dim**-0.5
    steps = mixing_weights(diffusion_coefficients(args.hops, 0.1))

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    ops = {"sdpa": sdpa, "diffuse": lambda: diffuse(q, k, v, graph, args.hops, 0.1, backend="gather")}
    if args.before:
        old = load_gather(args.before)
        ops[f"diffuse@{args.before}"] = lambda: old.gather_diffusion(q, k, v, graph, None, steps, scale)

    def step(op):
        ops[op]().backward(grad)
        q.grad = k.grad = v.grad = None

    for op in ops:  # warm-up (plans, allocator) and a check that the implementations agree
        for _ in range(args.warmup):
            step(op)
    with torch.no_grad():
        reference = ops["diffuse"]()
        for op in ops:
            if op.startswith("diffuse@"):
                torch.testing.assert_close(ops[op](), reference, rtol=1e-4, atol=1e-5)

    _malloc_mode(measure_memory=False)
    times = {op: [] for op in ops}
    for _ in range(args.rounds):
        for op in ops:
            start = time.perf_counter()
            step(op)
            times[op].append((time.perf_counter() - start) * 1e3)
    _malloc_mode(measure_memory=True)
    memory = {}
    for op in ops:
        with _PeakRSS() as rss:
            step(op)
        memory[op] = rss.peak - rss.base

    rows = {op: {"ms": statistics.median(t), "ms_min": min(t), "peak_mib": memory[op]} for op, t in times.items()}
    ratios = {
        op: {
            "time": statistics.median(a / b for a, b in zip(times[op], times["sdpa"])),
            "time_of_medians": rows[op]["ms"] / rows["sdpa"]["ms"],
            "time_min": rows[op]["ms_min"] / rows["sdpa"]["ms_min"],
            "memory": memory[op] / memory["sdpa"],
        }
        for op in ops
        if op != "sdpa"
    }
    result = {
        "environment": {**environment(torch.device("cpu")), "command": command_line(argv)},
        "settings": vars(args) | {"graph": repr(graph), "dtype": "float32", "batch": 1},
        "rows": rows,
        "ratios_to_sdpa": ratios,
        "times_ms": times,
    }
    for op, row in rows.items():
        extra = ""
        if op in ratios:
            r = ratios[op]
            extra = f"  / sdpa: time {r['time']:.3f}x (min {r['time_min']:.3f}x), memory {r['memory']:.3f}x"
        print(f"{op:>16}: {row['ms']:8.1f} ms (min {row['ms_min']:.1f}), {row['peak_mib']:6.1f} MiB{extra}")
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
