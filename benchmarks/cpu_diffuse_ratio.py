"""CPU: ``diffuse`` (gather backend) against one dense masked SDPA, forward+backward, side by side.

The question of issue 42, part 3: at 4K tokens, float32, 8 heads x 64, 2 threads, on the README's CPU benchmark graph
(bigbird: block 64, window 3, 2 global, 3 random), does ``diffuse`` with 5 hops take at most half the time and half
the extra memory of one ``F.scaled_dot_product_attention`` with the graph's boolean mask?

Time: every round runs one step of each op back to back, in an order that rotates from round to round, so a burst
of load from other jobs on a shared machine hits all of them alike; the time ratio is the median over rounds of the
per-round ratios (medians and minima are recorded too). ``--before REV`` adds the gather backend of git revision
``REV`` (loaded from ``git show``) as a third op, so before and after run side by side.

Memory: each op in a fresh process (no allocator state left by the others), one step after a warm-up, measured two
ways: the peak resident set size above the inputs, sampled as ``hopformer bench`` does
(``hopformer.bench.harness``: glibc returning freed blocks), and the peak of the bytes PyTorch's allocator holds
(from the profiler's allocation events: exact, and blind to the C library's caching).

Each run is appended to the summary JSON at ``--out`` (with the exact command, device, versions and load), and a
plot of every run's ratios is written beside it::

    python benchmarks/cpu_diffuse_ratio.py --threads 2 --rounds 10 --before main \\
        --out benchmarks/results/cpu_diffuse_2threads/summary.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
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

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.5  # the ratio for time and for memory


def load_gather(rev: str):
    """The ``gather`` backend module of git revision ``rev``; custom ops it registers are renamed so that they do
    not clash with the checkout's own."""
    source = subprocess.run(
        ["git", "show", f"{rev}:hopformer/ops/gather.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    source = source.replace('"hopformer::', '"hopformer_before::').replace(
        "torch.ops.hopformer.", "torch.ops.hopformer_before."
    )
    name = f"hopformer_gather_at_{rev}".replace("-", "_").replace(".", "_").replace("/", "_")
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:hopformer/ops/gather.py", "exec"), module.__dict__)  # noqa: S102
    return module


def make_ops(args: argparse.Namespace):
    """The inputs and a forward+backward step of each op (a dict name -> step)."""
    torch.set_num_threads(args.threads)
    graph = build_graph("bigbird", args.seq_len, block_size=64, window=3, num_global=2, num_random=3, seed=0)
    shape = (1, args.heads, args.seq_len, args.head_dim)
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape)
    mask = graph.to_dense()
    steps = mixing_weights(diffusion_coefficients(args.hops, 0.1))
    scale = args.head_dim**-0.5
    calls = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        "diffuse": lambda: diffuse(q, k, v, graph, args.hops, 0.1, backend="gather"),
    }
    if args.before:
        old = load_gather(args.before)
        calls[f"diffuse@{args.before}"] = lambda: old.gather_diffusion(q, k, v, graph, None, steps, scale)

    def stepper(call):
        def step() -> None:
            call().backward(grad)
            q.grad = k.grad = v.grad = None

        return step

    return graph, {name: stepper(call) for name, call in calls.items()}, calls


def allocator_peak_mib(step) -> float:
    """Peak of the bytes PyTorch's allocator holds above the start during one ``step`` (profiler events)."""
    from torch._C._profiler import _EventType
    from torch.profiler import profile

    with profile(profile_memory=True) as prof:
        step()
    sizes = []

    def walk(event) -> None:
        if event.typed[0] == _EventType.Allocation:
            sizes.append((event.start_time_ns, event.typed[1].alloc_size))
        for child in event.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    current = peak = 0
    for _, size in sorted(sizes):
        current += size
        peak = max(peak, current)
    return peak / 2**20


def measure_memory(args: argparse.Namespace) -> dict:
    """(In a fresh process.) The memory of one op: RSS peak above the inputs, and the allocator's peak."""
    _, steps, _ = make_ops(args)
    step = steps[args.memory]
    for _ in range(max(args.warmup, 1)):
        step()
    _malloc_mode(measure_memory=True)
    with _PeakRSS() as rss:
        step()
    return {"peak_rss_mib": rss.peak - rss.base, "peak_alloc_mib": allocator_peak_mib(step)}


def memory_in_subprocess(args: argparse.Namespace, op: str) -> dict:
    command = [sys.executable, __file__, "--memory", op] + _settings_argv(args)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _settings_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--seq-len", str(args.seq_len), "--heads", str(args.heads), "--head-dim", str(args.head_dim),
            "--hops", str(args.hops), "--threads", str(args.threads), "--warmup", str(args.warmup)]  # fmt: skip
    return argv + (["--before", args.before] if args.before else [])


def run(args: argparse.Namespace) -> dict:
    graph, steps, calls = make_ops(args)
    names = list(steps)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load_before = [round(x, 2) for x in os.getloadavg()]
    for name in names:  # warm-up (plans, allocator) and a check that the implementations agree
        for _ in range(args.warmup):
            steps[name]()
    with torch.no_grad():
        reference = calls["diffuse"]()
        for name in names:
            if name.startswith("diffuse@"):
                torch.testing.assert_close(calls[name](), reference, rtol=1e-4, atol=1e-5)
    _malloc_mode(measure_memory=False)
    times = {name: [] for name in names}
    for index in range(args.rounds):
        for offset in range(len(names)):  # rotate the order from round to round
            name = names[(index + offset) % len(names)]
            start = time.perf_counter()
            steps[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    load_after = [round(x, 2) for x in os.getloadavg()]
    memory = {name: memory_in_subprocess(args, name) for name in names}

    rows = {
        name: {"ms": statistics.median(t), "ms_min": min(t), "times_ms": [round(x, 2) for x in t], **memory[name]}
        for name, t in times.items()
    }
    sdpa = rows["sdpa"]
    ratios = {
        name: {
            "time": statistics.median(a / b for a, b in zip(times[name], times["sdpa"])),
            "time_of_medians": row["ms"] / sdpa["ms"],
            "time_min": row["ms_min"] / sdpa["ms_min"],
            "memory_rss": row["peak_rss_mib"] / sdpa["peak_rss_mib"],
            "memory_alloc": row["peak_alloc_mib"] / sdpa["peak_alloc_mib"],
        }
        for name, row in rows.items()
        if name != "sdpa"
    }
    record = {
        "environment": {
            **environment(torch.device("cpu")),
            "command": command_line(sys.argv[1:]),
            "load_average_before": load_before,
            "load_average_after": load_after,
            "started": started,
        },
        "graph": repr(graph),
        "rows": rows,
        "ratios_to_sdpa": ratios,
    }
    for name, row in rows.items():
        extra = ""
        if name in ratios:
            r = ratios[name]
            extra = (
                f"  / sdpa: time {r['time']:.3f}x (min {r['time_min']:.3f}x), memory {r['memory_rss']:.3f}x RSS, "
                f"{r['memory_alloc']:.3f}x allocated"
            )
        print(
            f"{name:>16}: {row['ms']:8.1f} ms (min {row['ms_min']:.1f}), {row['peak_rss_mib']:6.1f} MiB RSS, "
            f"{row['peak_alloc_mib']:6.1f} MiB allocated{extra}"
        )
    return record


def summarize(path: Path, record: dict, args: argparse.Namespace) -> dict:
    """Append ``record`` to the summary at ``path`` (same settings only) and recompute the aggregate."""
    settings = {"seq_len": args.seq_len, "heads": args.heads, "head_dim": args.head_dim, "hops": args.hops,
                "threads": args.threads, "rounds": args.rounds, "dtype": "float32", "batch": 1,
                "graph": "bigbird(block 64, window 3, 2 global, 3 random, seed 0)"}  # fmt: skip
    summary = json.loads(path.read_text()) if path.exists() else {"settings": settings, "runs": []}
    if summary["settings"] != settings:
        raise SystemExit(f"{path} holds runs with other settings: {summary['settings']}")
    summary["question"] = (
        f"diffuse ({args.hops} hops, gather) forward+backward at most {TARGET}x the time and {TARGET}x the extra "
        "memory of one dense masked SDPA forward+backward, in the same run"
    )
    summary["runs"].append(record)
    diffuse_ratios = [run["ratios_to_sdpa"]["diffuse"] for run in summary["runs"]]
    summary["aggregate"] = {
        key: {
            "runs": [round(r[key], 4) for r in diffuse_ratios],
            "median": statistics.median(r[key] for r in diffuse_ratios),
        }
        for key in ("time", "time_min", "memory_rss", "memory_alloc")
    }
    summary["target_met"] = {
        "time": all(r["time"] <= TARGET for r in diffuse_ratios),
        "memory_rss": all(r["memory_rss"] <= TARGET for r in diffuse_ratios),
        "memory_alloc": all(r["memory_alloc"] <= TARGET for r in diffuse_ratios),
    }
    write_json(path, summary)
    return summary


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = summary["runs"]
    labels = [f"run {i + 1}\n(load {run['environment']['load_average_before'][0]:.1f})" for i, run in enumerate(runs)]
    series = [("time", "time (median of per-round ratios)"), ("memory_rss", "memory: peak RSS"),
              ("memory_alloc", "memory: allocator peak")]  # fmt: skip
    ops = [name for name in runs[0]["ratios_to_sdpa"]]
    figure, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.8), sharey=True)
    width = 0.8 / len(ops)
    for ax, (key, title) in zip(axes, series):
        for j, op in enumerate(ops):
            values = [run["ratios_to_sdpa"].get(op, {}).get(key, float("nan")) for run in runs]
            positions = [i + (j - (len(ops) - 1) / 2) * width for i in range(len(runs))]
            ax.bar(positions, values, width, label=op)
            for x, value in zip(positions, values):
                ax.text(x, value + 0.01, f"{value:.3f}", ha="center", va="bottom", fontsize=7)
        ax.axhline(TARGET, color="black", linestyle="--", linewidth=1, label=f"target {TARGET}x")
        ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
        ax.set_xticks(range(len(runs)), labels, fontsize=8)
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("ratio to dense masked SDPA (fwd+bwd)")
    axes[0].set_ylim(0, 1.2)
    axes[0].legend(fontsize=8, loc="upper left", ncol=3)
    settings = summary["settings"]
    figure.suptitle(
        f"CPU, {settings['threads']} threads, {settings['seq_len']} tokens, {settings['heads']} heads x "
        f"{settings['head_dim']}, float32: diffuse ({settings['hops']} hops) / SDPA",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--plot-only"]:  # redraw the plot of an existing summary
        path = Path(sys.argv[2])
        plot(json.loads(path.read_text()), path.with_suffix(".png"))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--hops", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--before", default=None, help="git revision whose gather backend also runs")
    parser.add_argument("--out", default=None, help="summary JSON to append this run to (a PNG is written beside)")
    parser.add_argument("--memory", default=None, help=argparse.SUPPRESS)  # internal: measure one op's memory
    args = parser.parse_args(argv)
    if args.memory:
        print(json.dumps(measure_memory(args)))
        return 0
    record = run(args)
    if args.out:
        path = Path(args.out)
        summary = summarize(path, record, args)
        plot(summary, path.with_suffix(".png"))
        print(f"appended run {len(summary['runs'])} to {path}; plot {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
