"""Time and peak memory of attention ops, forward and forward+backward, against sequence length.

Every case runs in this process: CUDA memory is ``max_memory_allocated`` above the inputs; CPU memory
is the peak resident set size above the inputs during one extra step, sampled by a background thread
with glibc returning freed blocks to the OS (see ``_malloc_mode``). Times are medians.
"""

from __future__ import annotations

import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import hopformer
from hopformer.graphs import build_graph
from hopformer.ops import diffuse, sparse_attention


@dataclass
class Case:
    op: str  # "sdpa" (dense attention, masked with the graph on CPU), "sparse", "diffuse"
    backend: str  # "sdpa", "gather", "flex", "dense"
    seq_len: int
    mode: str  # "fwd" or "fwd+bwd"


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def _malloc_mode(measure_memory: bool) -> None:
    """Fix glibc's mmap threshold (it otherwise adapts to earlier cases). For memory, blocks >= 64 KiB
    are mmapped and unmapped on free, so the resident set size follows live memory; for time, the
    threshold is glibc's adaptive maximum (32 MiB), which keeps freed memory for reuse."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    threshold = 1 << 16 if measure_memory else 32 << 20
    libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 2 * threshold)  # M_TRIM_THRESHOLD
    if measure_memory:
        libc.malloc_trim(0)  # hand back what earlier steps freed, so the peak is this step's own


class _PeakRSS:
    """Samples the resident set size every ~0.5 ms while active (CPU peak memory)."""

    def __enter__(self):
        self.base = self.peak = _rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mib())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())


def environment(device: torch.device) -> dict:
    info = {
        "hopformer": hopformer.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "command": " ".join(sys.argv),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def run_case(case: Case, settings: dict, device: torch.device, repeats: int, warmup: int) -> dict:
    """Measure one case; returns its row (``ms``, ``peak_mib``, or ``error``)."""
    dtype = getattr(torch, settings["dtype"])
    shape = (settings["batch"], settings["heads"], case.seq_len, settings["head_dim"])
    graph = build_graph(settings["pattern"], case.seq_len, **settings["graph_options"])
    backward = case.mode == "fwd+bwd"
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=backward) for _ in range(3))
    grad = torch.randn(shape, device=device, dtype=dtype)
    dense_mask = graph.to_dense(device) if case.op == "sdpa" and device.type == "cpu" else None

    def call() -> torch.Tensor:
        if case.op == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask)
        if case.op == "sparse":
            return sparse_attention(q, k, v, graph, backend=case.backend)
        return diffuse(q, k, v, graph, settings["hops"], settings["alpha"], backend=case.backend)

    def step() -> None:
        out = call()
        if backward:
            out.backward(grad)
            q.grad = k.grad = v.grad = None

    row = asdict(case)
    try:
        with torch.set_grad_enabled(backward):
            for _ in range(warmup):
                step()
            _sync(device)
            times = []
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                for _ in range(repeats):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    step()
                    end.record()
                    torch.cuda.synchronize(device)
                    times.append(start.elapsed_time(end))
                peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            else:
                _malloc_mode(measure_memory=False)
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    step()
                    times.append((time.perf_counter() - t0) * 1e3)
                _malloc_mode(measure_memory=True)
                with _PeakRSS() as rss:  # one more step, for memory only
                    step()
                peak = rss.peak - rss.base
        row.update(ms=statistics.median(times), ms_min=min(times), peak_mib=peak)
    except (torch.OutOfMemoryError, RuntimeError, ValueError) as error:
        row.update(error=f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
    return row


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_grid(
    cases: list[Case],
    settings: dict,
    device: torch.device,
    repeats: int,
    warmup: int,
    progress: Callable[[dict], None] | None = None,
) -> list[dict]:
    rows = []
    for case in cases:
        row = run_case(case, settings, device, repeats, warmup)
        rows.append(row)
        if progress:
            progress(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def plot(result: dict, path: str) -> None:
    """Time and peak memory against sequence length, one line per (op, backend, mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "ms" in r]
    figure, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for key in sorted({(r["op"], r["backend"], r["mode"]) for r in rows}):
        series = sorted((r for r in rows if (r["op"], r["backend"], r["mode"]) == key), key=lambda r: r["seq_len"])
        label = f"{key[0]} [{key[1]}] {key[2]}"
        style = "--" if key[2] == "fwd" else "-"
        lengths = [r["seq_len"] for r in series]
        time_ax.plot(lengths, [r["ms"] for r in series], style, marker="o", label=label)
        memory_ax.plot(lengths, [max(r["peak_mib"], 1e-3) for r in series], style, marker="o", label=label)
    s = result["settings"]
    title = f"{s['pattern']} {s['graph_options']}, B={s['batch']} H={s['heads']} D={s['head_dim']} {s['dtype']}"
    for ax, ylabel in ((time_ax, "time (ms, median)"), (memory_ax, "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    time_ax.legend(fontsize=7)
    figure.suptitle(f"{result['environment'].get('gpu', result['environment'].get('cpu'))}: {title}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
