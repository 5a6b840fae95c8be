"""Combiner-Logsparse's eager path on CPU: time, peak allocator bytes and aten op count of one forward+backward.

Runs the working tree's ``_logsparse`` and a git revision's (``--before``, default ``main``) side by side in one
process: float32, batch 1, 4 heads x 64, block 2, bidirectional and causal, no padding.

    PYTHONPATH=$PWD python experiments/logsparse_memory_cpu.py [--lengths 4096 16384] [--before main]

- time: median of ``--repeats`` forward+backward passes after one warm-up, ``torch.set_num_threads(2)``;
- peak: the largest running sum of the CPU allocator's allocation and free events (``torch.profiler`` with
  ``profile_memory=True``) during one forward+backward, over what was allocated before it;
- ops: aten calls seen by a ``TorchDispatchMode`` during one forward+backward, all of them and those that are not
  views (roughly the kernels a GPU would launch).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hopformer.ops.combiner_attention as after_module  # noqa: E402

MODULE = "hopformer/ops/combiner_attention.py"


def load_revision(rev: str):
    """``combiner_attention.py`` as of git revision ``rev``, imported as a module of its own."""
    source = subprocess.run(["git", "show", f"{rev}:{MODULE}"], cwd=ROOT, check=True, capture_output=True, text=True)
    path = Path(tempfile.mkdtemp()) / "combiner_before.py"
    path.write_text(source.stdout)
    spec = importlib.util.spec_from_file_location("combiner_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = self.compute = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        self.compute += not func.is_view
        return func(*args, **(kwargs or {}))


def inputs(seq: int, heads: int, dim: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, heads, seq, dim, generator=g).requires_grad_() for _ in range(3)]


def step(module, q, k, v, causal: bool) -> None:
    """One forward+backward of logsparse (block 2, every token real) through the eager runner."""
    out = module.EAGER.combine(q, k, v, "logsparse", 2, causal, None, q.shape[-1] ** -0.5, 0.0)
    out.backward(torch.ones_like(out))
    for x in (q, k, v):
        x.grad = None


def peak_bytes(module, q, k, v, causal: bool) -> int:
    with profile(profile_memory=True, activities=[ProfilerActivity.CPU]) as prof:
        step(module, q, k, v, causal)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return peak


def op_counts(module, q, k, v, causal: bool) -> tuple[int, int]:
    """(all aten ops, those that are not views)."""
    with OpCounter() as counter:
        step(module, q, k, v, causal)
    return counter.count, counter.compute


def median_ms(module, q, k, v, causal: bool, repeats: int) -> float:
    step(module, q, k, v, causal)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(module, q, k, v, causal)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--before", default="main", help="git revision of the 'before' implementation")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    versions = {"before": load_revision(args.before), "after": after_module}
    print(f"torch {torch.__version__}, float32, batch 1, {args.heads} heads x {args.dim}, block 2, fwd+bwd")
    print("| L | mode | version | time ms | peak MiB | aten ops | non-view ops |\n|---|---|---|---|---|---|---|")
    for seq in args.lengths:
        q, k, v = inputs(seq, args.heads, args.dim)
        for causal in (False, True):
            for name, module in versions.items():
                ms = median_ms(module, q, k, v, causal, args.repeats)
                peak = peak_bytes(module, q, k, v, causal) / 2**20
                ops, compute = op_counts(module, q, k, v, causal)
                mode = "causal" if causal else "bidirectional"
                print(f"| {seq} | {mode} | {name} | {ms:.1f} | {peak:.1f} | {ops} | {compute} |", flush=True)


if __name__ == "__main__":
    main()
