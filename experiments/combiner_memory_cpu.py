"""Combiner's eager path on CPU: time, peak allocator bytes and aten op count of one forward+backward.

Runs the working tree's eager Combiner and a git revision's (``--before``, default ``main``) side by side in one
process: float32, batch 1, 4 heads x 64, bidirectional and causal, no padding; logsparse in blocks of 2, the other
variants with their default block (row) of ``ceil(sqrt(L))``.

    PYTHONPATH=$PWD python experiments/combiner_memory_cpu.py [--variant logsparse] [--lengths 4096 16384]
    PYTHONPATH=$PWD python experiments/combiner_memory_cpu.py --flex-stub [--lengths 16384]

``--flex-stub`` measures instead what the ``flex`` path of the axial forms and mixture holds around its kernels:
FlexAttention is replaced by a stub that computes nothing and keeps what a flash kernel keeps for its backward
(q, k, v, out, lse), so the peak is everything else: summaries, layouts, merges and gradients. It is printed in
units of one ``(L, d)`` tensor of the inputs (a flash attention's own forward+backward holds about 4: its output and
the three input gradients).

- time: median of ``--repeats`` forward+backward passes after one warm-up, ``torch.set_num_threads(2)``;
- peak: the largest running sum of the CPU allocator's allocation and free events (``torch.profiler`` with
  ``profile_memory=True``) during one forward+backward, over what was allocated before it;
- ops: aten calls seen by a ``TorchDispatchMode`` during one forward+backward, all of them and those that are not
  views (roughly the kernels a GPU would launch).
"""

from __future__ import annotations

import argparse
import functools
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


VARIANT = "logsparse"  # set from --variant


def step(module, q, k, v, causal: bool) -> None:
    """One forward+backward of the variant (every token real) through the eager runner."""
    block = 2 if VARIANT == "logsparse" else module.resolve_block_size(VARIANT, None, q.shape[2])
    scale = q.shape[-1] ** -0.5
    forward_backward(lambda *qkv: module.EAGER.combine(*qkv, VARIANT, block, causal, None, scale, 0.0), q, k, v)


def forward_backward(forward, *inputs: torch.Tensor) -> None:
    out = forward(*inputs)
    out.backward(torch.ones_like(out))
    for x in inputs:
        x.grad = None


def peak_bytes(forward_backward) -> int:
    """The allocator's peak above its level at the start, during one call of ``forward_backward()``."""
    with profile(profile_memory=True, activities=[ProfilerActivity.CPU]) as prof:
        forward_backward()
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


class _FlashStub(torch.autograd.Function):
    """Stands in for a FlexAttention call with ``return_lse``: keeps q, k, v, out, lse; computes nothing."""

    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = q.new_zeros(*q.shape[:-1], v.shape[-1]), q.new_zeros(q.shape[:-1])
        ctx.save_for_backward(q, k, v, out, lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def flex_stub_peaks(lengths: list[int], heads: int, dim: int) -> None:
    import hopformer.ops.combiner_flex as combiner_flex
    from hopformer.ops import flex

    flex.run_flex = lambda q, k, v, mask, scale, kernel_options=None, *, return_lse=False: _FlashStub.apply(q, k, v)
    flex.block_mask_from_codes = lambda *args, **kwargs: None
    print(f"torch {torch.__version__}, flex path with a stub kernel, float32, batch 1, {heads} heads x {dim}, fwd+bwd")
    print("| L | variant | mode | peak MiB | in (L, d) tensors |\n|---|---|---|---|---|")
    for seq in lengths:
        q, k, v = inputs(seq, heads, dim)
        width = after_module.resolve_block_size("axial", None, seq)
        for variant, forms in combiner_flex.AXIAL_FORMS.items():
            for causal in (False, True):
                axial = functools.partial(
                    combiner_flex._axial_flex, width=width, causal=causal, real=None, scale=dim**-0.5, forms=forms
                )
                peak = peak_bytes(functools.partial(forward_backward, axial, q, k, v))
                mode = "causal" if causal else "bidirectional"
                print(f"| {seq} | {variant} | {mode} | {peak / 2**20:.0f} | {peak / q.numel() / 4:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="logsparse", choices=after_module.VARIANTS)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--before", default="main", help="git revision of the 'before' implementation")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--flex-stub", action="store_true", help="the flex path's memory around a stub kernel")
    args = parser.parse_args()
    if args.flex_stub:
        return flex_stub_peaks(args.lengths, args.heads, args.dim)
    global VARIANT
    VARIANT = args.variant
    torch.set_num_threads(2)
    versions = {"before": load_revision(args.before), "after": after_module}
    print(f"torch {torch.__version__}, {VARIANT}, float32, batch 1, {args.heads} heads x {args.dim}, fwd+bwd")
    print("| L | mode | version | time ms | peak MiB | aten ops | non-view ops |\n|---|---|---|---|---|---|---|")
    for seq in args.lengths:
        q, k, v = inputs(seq, args.heads, args.dim)
        for causal in (False, True):
            for name, module in versions.items():
                ms = median_ms(module, q, k, v, causal, args.repeats)
                peak = peak_bytes(functools.partial(step, module, q, k, v, causal)) / 2**20
                ops, compute = op_counts(module, q, k, v, causal)
                mode = "causal" if causal else "bidirectional"
                print(f"| {seq} | {mode} | {name} | {ms:.1f} | {peak:.1f} | {ops} | {compute} |", flush=True)


if __name__ == "__main__":
    main()
