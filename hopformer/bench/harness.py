"""Time and peak memory of attention ops, forward and forward+backward, against sequence length.

Every case runs in this process: CUDA memory is ``max_memory_allocated`` above the inputs; CPU memory
is the peak resident set size above the inputs during one extra step, sampled by a background thread
with glibc returning freed blocks to the OS (see ``_malloc_mode``). Times are medians. A forward+backward row
also times its forward alone with autograd recording (``fwd_ms``), the reference of the inference check.

Every op gets the same ``(batch, heads, seq, head_dim)`` q, k, v (same seed) and the same output
gradient; what each op's step runs is in :data:`MEASURED` (written into every result JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import hopformer
from hopformer.bench import COMBINER_VARIANTS, OPS  # noqa: F401 (re-exported: callers import them from here)
from hopformer.graphs import build_graph
from hopformer.ops import diffuse, sparse_attention
from hopformer.ops.combiner_attention import combiner, resolve_block_size

MEASURED = {
    "sdpa": "F.scaled_dot_product_attention; on CPU with the graph's dense boolean (L, L) mask, on CUDA "
    "unmasked (full attention through the fused cuDNN / Flash kernels).",
    "sparse": "hopformer.ops.sparse_attention on the graph (bigbird), backend as named; the peers 'flexattention' "
    "and 'flexattention-flash' are PyTorch's compiled flex_attention itself under the graph's BlockMask, with "
    "Inductor's kernel and with kernel_options={'BACKEND': 'FLASH'} (FlashAttention-4, where PyTorch has it).",
    "diffuse": "hopformer.ops.diffuse on the graph, `hops` hops, backend as named.",
    "routing": "RoutingAttention.attend (the module's attention core, no projections) in training mode: "
    "local heads (blocked local attention: FlexAttention on the local block graph on CUDA, batched SDPA "
    "on CPU) on the first heads, routing heads on the rest with "
    "LayerNorm-ed q/k, k-means assignment (similarity, top-w membership, argmax), one EMA centroid "
    "update per step, statistics recording, clustered SDPA, scatter-mean and the commitment loss "
    "(included in the backward). k-means is initialised from the inputs once before the case, as the "
    "first training batch would. Forward rows run the same training-mode forward without autograd.",
    "combiner": "hopformer.ops.combiner (the module's core, no projections), variant as named, block size "
    "(row length) ceil(sqrt(L)) unless set (logsparse: 2), bidirectional, no padding; backend eager "
    "(batched SDPA / einsums) or flex (CUDA: Combiner-Fixed as one FlexAttention call over [tokens; summaries], "
    "the axial forms and mixture as row, column and summary FlexAttention calls merged by log-sum-exp).",
}


@dataclass
class Case:
    op: str  # one of OPS; "sdpa" is dense attention (masked with the graph on CPU)
    backend: str  # "sdpa", "gather", "flex", "dense"; routing: "eager"; combiner: "eager" or "flex" (CUDA)
    seq_len: int
    mode: str  # "fwd" or "fwd+bwd"
    variant: str | None = None  # combiner variant
    compiled: bool = False  # the step's call under torch.compile(fullgraph=True), one shape


# FlexAttention itself as the peer of `sparse`: its kernel options by backend name
FLEX_PEERS = {"flexattention": None, "flexattention-flash": {"BACKEND": "FLASH"}}


def label(row: dict) -> str:
    """Display name of a case or row: ``sparse [gather]``, ``combiner:fixed [eager]``, ``routing [eager+compile]``."""
    variant = f":{row['variant']}" if row.get("variant") else ""
    compiled = "+compile" if row.get("compiled") else ""
    return f"{row['op']}{variant} [{row['backend']}{compiled}]"


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


def positive_int(text: str) -> int:
    """``argparse`` type of a count that must be at least 1; argparse's error names the option and value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def command_line(argv: list[str] | None = None) -> str:
    """The command a benchmark script ran as, for its JSON record: the script's path relative to the working
    directory, then ``argv`` (the arguments ``main(argv)`` was given; ``None``: the command line's own)."""
    args = argv if argv is not None else sys.argv[1:]
    return " ".join([Path(os.path.relpath(sys.argv[0])).as_posix(), *args])


def write_json(path: str | os.PathLike, record: dict) -> None:
    """Write a benchmark's record atomically (a temporary file renamed over ``path``), folders made as needed."""
    folder = Path(path).resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as handle:
        handle.write(json.dumps(record, indent=1) + "\n")
    os.replace(handle.name, path)


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
    info.update(_git_state())
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]  # 1, 5, 15 min, when the run ended
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def _git_state() -> dict:
    """Commit of the checkout the package runs from, and its files under ``hopformer/`` that differ."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(hopformer.__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "hopformer"], cwd=root, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    if commit.returncode != 0:
        return {}
    return {"git_commit": commit.stdout.strip(), "git_modified": [line[3:] for line in status.stdout.splitlines()]}


def cuda_times_ms(step: Callable[[], object], repeats: int, device: torch.device | None = None) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``step``, timed by CUDA events (GPU time, one sync per call)."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    return times


def _times_ms(step: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``step``: CUDA events on a GPU, the wall clock on a CPU."""
    if device.type == "cuda":
        return cuda_times_ms(step, repeats, device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def run_case(case: Case, settings: dict, device: torch.device, repeats: int, warmup: int) -> dict:
    """Measure one case; returns its row (``ms``, ``peak_mib``, or ``error``)."""
    dtype = getattr(torch, settings["dtype"])
    shape = (settings["batch"], settings["heads"], case.seq_len, settings["head_dim"])
    backward = case.mode == "fwd+bwd"
    torch.manual_seed(settings.get("seed", 0))  # every op sees the same inputs
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=backward) for _ in range(3))
    grad = torch.randn(shape, device=device, dtype=dtype)

    row = asdict(case)
    try:
        call, config = _core(case, settings, device, q, k, v)
        if config:
            row["config"] = config
        if case.compiled:
            torch._dynamo.reset()  # each case compiles afresh: no recompile limit across cases
            call = torch.compile(call, fullgraph=True, dynamic=False)

        def step() -> None:
            out, loss = call()
            if backward:
                if loss is None:
                    out.backward(grad)
                else:  # an auxiliary loss (routing's commitment loss) joins the backward, as in training
                    torch.autograd.backward([out, loss], [grad, torch.ones_like(loss)])
                q.grad = k.grad = v.grad = None

        with torch.set_grad_enabled(backward):
            if case.compiled:  # the first step compiles: timed on its own
                started = time.perf_counter()
                step()
                _sync(device)
                row["compile_s"] = round(time.perf_counter() - started, 2)
            for _ in range(warmup):
                step()
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                times = _times_ms(step, repeats, device)
                peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            else:
                _malloc_mode(measure_memory=False)
                times = _times_ms(step, repeats, device)
                _malloc_mode(measure_memory=True)
                with _PeakRSS() as rss:  # one more step, for memory only
                    step()
                peak = rss.peak - rss.base
        row.update(ms=statistics.median(times), ms_min=min(times), peak_mib=peak)
        if backward:  # the forward alone as training runs it (autograd recording), for the inference check
            with torch.enable_grad():
                forward_times = _times_ms(lambda: call(), repeats, device)
            row["fwd_ms"] = statistics.median(forward_times)
    except (torch.OutOfMemoryError, RuntimeError, ValueError) as error:
        row.update(error=f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
    return row


def _core(case: Case, settings: dict, device: torch.device, q, k, v) -> tuple[Callable, dict]:
    """The op's call, returning ``(output, auxiliary loss or None)``, and its resolved configuration."""
    if case.op in ("sdpa", "sparse", "diffuse"):
        graph = build_graph(settings["pattern"], case.seq_len, **settings["graph_options"])
        if case.op == "sdpa":
            mask = graph.to_dense(device) if device.type == "cpu" else None
            return (lambda: (F.scaled_dot_product_attention(q, k, v, attn_mask=mask), None)), {}
        if case.op == "sparse" and case.backend in FLEX_PEERS:
            return _flex_peer(graph, case.backend, q, k, v), {}
        if case.op == "sparse":
            return (lambda: (sparse_attention(q, k, v, graph, backend=case.backend), None)), {}
        hops, alpha = settings["hops"], settings["alpha"]
        return (lambda: (diffuse(q, k, v, graph, hops, alpha, backend=case.backend), None)), {}
    if case.op == "combiner":
        options = settings.get("combiner", {})
        block = resolve_block_size(case.variant, options.get("block_size"), case.seq_len)
        run = lambda: (combiner(q, k, v, case.variant, block, backend=case.backend), None)  # noqa: E731
        return run, {"block_size": block}
    if case.op == "routing":
        module = routing_module(settings, case.seq_len, device)
        with torch.no_grad():  # k-means initialisation from the inputs, as on the first training batch
            module.attend(q.detach(), k.detach(), v.detach(), None)

        def call():
            out = module.attend(q, k, v, None)
            return out, module.aux_loss

        window = module.window if module.window is not None else max(1, case.seq_len // module.clusters)
        config = {
            "local_heads": module.local_heads,
            "routing_heads": module.routing_heads,
            "local_window": module.local_window,
            "clusters": module.clusters,
            "window": window,
        }
        return call, config
    raise ValueError(f"op={case.op!r} is not known; choose from {list(OPS)}")


def _flex_peer(graph, backend: str, q, k, v) -> Callable:
    """PyTorch's compiled ``flex_attention`` under the graph's BlockMask (no hopformer code in the timed step)."""
    from hopformer.ops import flex

    if graph.seq_len % flex.TILE:
        raise ValueError(f"{backend} needs a length that is a multiple of {flex.TILE}, got {graph.seq_len}")
    if not q.is_cuda:
        raise ValueError(f"{backend} runs on CUDA only")
    plan = flex.block_mask(graph, None, q.device)
    options = FLEX_PEERS[backend]
    return lambda: (flex.run_flex(q, k, v, plan.mask, q.shape[-1] ** -0.5, options or {}), None)


def routing_module(settings: dict, seq_len: int, device: torch.device):
    """The Routing module whose core is measured: defaults as the module's, ``max_seq_len = seq_len``
    (so ``round(sqrt(L))`` clusters of ``L // clusters`` members), training mode."""
    from hopformer.attention.routing import RoutingAttention

    options = {key: value for key, value in settings.get("routing", {}).items() if value is not None}
    heads = settings["heads"]
    module = RoutingAttention(heads * settings["head_dim"], heads, max_seq_len=seq_len, **options)
    return module.to(device).train()


def dense_skip_reason(
    case: Case,
    settings: dict,
    device: torch.device,
    rows: list[dict],
    steps: int,
    budget_s: float,
) -> str | None:
    """Why dense SDPA should not run at this length, or None.

    Memory: on CPU it takes the graph's dense boolean mask (``L^2`` bytes, the fused CPU kernel tiles
    the scores); skipped when that exceeds half the available memory. On CUDA it runs unmasked through
    the fused kernels (no ``L^2`` tensor), so memory is no reason. Time: the per-step time is
    extrapolated quadratically from the longest dense row of the same mode measured in this run (or
    from a short probe at 1024 tokens); skipped when ``steps`` steps would take more than ``budget_s``.
    """
    seq = case.seq_len
    if device.type == "cpu":
        need = seq * seq
        available = _available_bytes()
        if available is not None and need > available / 2:
            return (
                f"memory: the dense boolean mask ({need / 2**30:.1f} GiB) exceeds half the available "
                f"memory ({available / 2**30:.1f} GiB)"
            )
    measured = [r for r in rows if r["op"] == "sdpa" and r["mode"] == case.mode and "ms" in r]
    if measured:
        reference = max(measured, key=lambda r: r["seq_len"])
        source = f"measured {reference['ms']:.1f} ms at L={reference['seq_len']} in this run"
    elif seq > 2048:
        probe = Case("sdpa", "sdpa", 1024, case.mode)
        reference = run_case(probe, settings, device, repeats=1, warmup=1)
        if "ms" not in reference:
            return None  # let the real case run and report its own error
        source = f"probe: {reference['ms']:.1f} ms at L=1024"
    else:
        return None
    predicted_ms = reference["ms"] * (seq / reference["seq_len"]) ** 2
    if predicted_ms * steps / 1e3 > budget_s:
        return (
            f"time: about {predicted_ms / 1e3:.3g} s per step (quadratic from {source}), "
            f"{steps} steps exceed the {budget_s:g} s budget per case (--case-budget-s)"
        )
    return None


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _load_1min() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


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
    case_budget_s: float | None = None,
    time_limit_s: float | None = None,
) -> list[dict]:
    """Run the cases in order. With ``case_budget_s``, dense SDPA cases that would not fit or would
    take longer than that (see :func:`dense_skip_reason`) are recorded as ``skipped`` with the reason;
    with ``time_limit_s``, so is every case not started within that many seconds of the run."""
    rows = []
    steps = warmup + repeats + (device.type == "cpu")
    run_start = time.perf_counter()
    for case in cases:
        reason = None
        elapsed = time.perf_counter() - run_start
        if time_limit_s is not None and elapsed > time_limit_s:
            reason = f"run time limit: not started, {elapsed:.0f} s into the run (--time-limit-s {time_limit_s:g})"
        elif case.op == "sdpa" and case_budget_s is not None:
            reason = dense_skip_reason(case, settings, device, rows, steps, case_budget_s)
        started = time.perf_counter()
        load = _load_1min()
        row = {**asdict(case), "skipped": reason} if reason else run_case(case, settings, device, repeats, warmup)
        row["wall_s"] = round(time.perf_counter() - started, 2)  # the whole case: set-up, warm-up, steps
        if device.type == "cpu" and load is not None:  # other jobs on the machine inflate CPU times
            row["load_1min"] = [load, _load_1min()]  # before and after the case
        rows.append(row)
        if progress:
            progress(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """Time and memory of every row over dense SDPA's and over each ``sparse`` (bigbird) row's, same
    length and mode, from the same run. Entries against ``sparse`` carry ``within_3x_time_2x_memory``
    (the benchmark criterion of issue 4)."""
    measured = [r for r in rows if "ms" in r]
    out = []
    for seq_len, mode in sorted({(r["seq_len"], r["mode"]) for r in measured}, key=lambda x: (x[0], x[1] != "fwd")):
        group = [r for r in measured if (r["seq_len"], r["mode"]) == (seq_len, mode)]
        references = [r for r in group if r["op"] == "sdpa"] + [r for r in group if r["op"] == "sparse"]
        for reference in references:
            for row in group:
                if row["op"] == "sdpa" or row is reference or (row["op"] == "sparse" and reference["op"] == "sparse"):
                    continue
                entry = {
                    "seq_len": seq_len,
                    "mode": mode,
                    "op": label(row),
                    "reference": label(reference),
                    "time": row["ms"] / reference["ms"],  # medians
                    "time_min": row["ms_min"] / reference["ms_min"],  # fastest steps: less hit by other jobs
                    "memory": row["peak_mib"] / max(reference["peak_mib"], 1e-9),
                }
                if reference["op"] == "sparse":
                    entry["within_3x_time_2x_memory"] = entry["time"] <= 3.0 and entry["memory"] <= 2.0
                out.append(entry)
    return out


def floors(rows: list[dict], settings: dict) -> list[dict]:
    """Each ``sparse`` and ``diffuse`` row against its FLOP floor: the time of its block-sparse passes (1 for
    sparse attention, ``hops + 1`` for diffusion) at the rate dense SDPA reached in the same run and mode.
    A pass over a graph of density ``p`` costs ``p`` times dense attention's FLOPs, so its floor is ``p`` times
    SDPA's time at that length; where SDPA was not run at a length, its time is scaled from the longest length
    it ran at by ``(L / L_ref)**2`` (its FLOPs)."""
    dense = {(r["seq_len"], r["mode"]): r["ms"] for r in rows if r["op"] == "sdpa" and "ms" in r}
    densities: dict[int, float] = {}  # one graph per length, whatever the rows' ops, modes and backends
    out = []
    for row in rows:
        if row["op"] not in ("sparse", "diffuse") or "ms" not in row:
            continue
        seq_len, mode = row["seq_len"], row["mode"]
        references = [length for length, m in dense if m == mode and length <= seq_len]
        if not references:
            continue
        reference = seq_len if (seq_len, mode) in dense else max(references)
        sdpa_ms = dense[(reference, mode)] * (seq_len / reference) ** 2
        if seq_len not in densities:
            densities[seq_len] = build_graph(settings["pattern"], seq_len, **settings["graph_options"]).density
        density = densities[seq_len]
        passes = 1 if row["op"] == "sparse" else settings["hops"] + 1
        floor_ms = passes * density * sdpa_ms
        out.append(
            {
                "seq_len": seq_len,
                "mode": mode,
                "op": label(row),
                "passes": passes,
                "density": density,
                "sdpa_reference_len": reference,
                "floor_ms": floor_ms,
                "over_floor": row["ms"] / floor_ms,
            }
        )
    return out


def inference(rows: list[dict]) -> list[dict]:
    """Each op's forward without autograd (its ``fwd`` row) over its forward as training runs it (``fwd_ms`` of
    its ``fwd+bwd`` row), same length, from the same run: the inference path stores nothing for a backward, so
    it should take no longer (``within_1_1x``: at most 1.1x)."""
    training = {(label(r), r["seq_len"]): r["fwd_ms"] for r in rows if "fwd_ms" in r}
    out = []
    for row in rows:
        key = (label(row), row["seq_len"])
        if row["mode"] != "fwd" or "ms" not in row or key not in training:
            continue
        ratio = row["ms"] / training[key]
        out.append(
            {
                "seq_len": row["seq_len"],
                "op": label(row),
                "inference_ms": row["ms"],
                "training_forward_ms": training[key],
                "ratio": ratio,
                "within_1_1x": ratio <= 1.1,
            }
        )
    return out


def inference_line(entry: dict) -> str:
    return (
        f"L={entry['seq_len']}: {entry['op']} inference {entry['inference_ms']:.2f} ms = {entry['ratio']:.2f}x its "
        f"training forward ({entry['training_forward_ms']:.2f} ms)"
    )


def floor_line(entry: dict) -> str:
    return (
        f"L={entry['seq_len']} {entry['mode']}: {entry['op']} = {entry['over_floor']:.2f}x its floor "
        f"({entry['floor_ms']:.2f} ms: {entry['passes']} pass(es) at density {entry['density']:.4f}, SDPA's rate "
        f"at L={entry['sdpa_reference_len']})"
    )


def ratio_line(entry: dict) -> str:
    return (
        f"L={entry['seq_len']} {entry['mode']}: {entry['op']} / {entry['reference']} = "
        f"{entry['time']:.2f}x time (min {entry['time_min']:.2f}x), {entry['memory']:.2f}x memory"
    )


def table(result: dict, mode: str) -> str:
    """Markdown table of one mode: per op and length, time, peak memory and both over the first
    ``sparse`` (bigbird) row of that length."""
    rows = [r for r in result["rows"] if r["mode"] == mode]
    lengths = sorted({r["seq_len"] for r in rows})
    names = list(dict.fromkeys(label(r) for r in rows))
    index = {(label(r), r["seq_len"]): r for r in rows}
    head = ["op, " + mode] + [f"{n} tokens: {part}" for n in lengths for part in ("ms", "MiB", "/ bigbird")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        cells = [name]
        for n in lengths:
            row = index.get((name, n))
            reference = next((r for r in rows if r["op"] == "sparse" and r["seq_len"] == n and "ms" in r), None)
            if row is None:
                cells += ["-", "-", "-"]
            elif "ms" not in row:
                cells += ["skipped" if row.get("skipped") else "error", "-", "-"]
            else:
                versus = "-"
                if reference is not None and row is not reference:
                    versus = (
                        f"{row['ms'] / reference['ms']:.2f}x / "
                        f"{row['peak_mib'] / max(reference['peak_mib'], 1e-9):.2f}x"
                    )
                cells += [f"{row['ms']:.1f}", f"{row['peak_mib']:.0f}", versus]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_title(pattern: str, options: dict) -> str:
    """A graph's settings as words for a figure title: ``bigbird graph: 64-token blocks, window 3, ...``."""
    words = {
        "block_size": "{}-token blocks",
        "window": "window {} blocks",
        "num_global": "{} global blocks",
        "num_random": "{} random blocks",
        "seed": "seed {}",
    }
    parts = [words.get(key, key.replace("_", " ") + " {}").format(value) for key, value in options.items()]
    return f"{pattern} graph" + (f": {', '.join(parts)}" if parts else "")


def plot(result: dict, path: str) -> None:
    """Time and peak memory against sequence length, one line per (op, backend, mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = [r for r in result["rows"] if "ms" in r]
    figure, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(12, 5.2), dpi=120)
    names = list(dict.fromkeys(label(r) for r in rows))
    colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for key in sorted({(label(r), r["mode"]) for r in rows}, key=lambda x: (names.index(x[0]), x[1])):
        series = sorted((r for r in rows if (label(r), r["mode"]) == key), key=lambda r: r["seq_len"])
        style = dict(
            color=colours(names.index(key[0])), linestyle="--" if key[1] == "fwd" else "-", marker="o", markersize=3
        )
        lengths = [r["seq_len"] for r in series]
        time_ax.plot(lengths, [r["ms"] for r in series], **style)
        memory_ax.plot(lengths, [max(r["peak_mib"], 1e-3) for r in series], **style)
    s = result["settings"]
    title = (
        f"{plot_title(s['pattern'], s['graph_options'])}; batch {s['batch']}, {s['heads']} heads of {s['head_dim']}, "
    )
    title += s["dtype"]
    if result["environment"].get("device") == "cpu":
        title += f", {result['environment'].get('threads')} thread(s)"
    for ax, ylabel in ((time_ax, "time (ms, median)"), (memory_ax, "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colours(i), marker="o", markersize=3, label=name) for i, name in enumerate(names)]
    handles += [Line2D([], [], color="k", linestyle=dash, label=m) for dash, m in (("--", "fwd"), ("-", "fwd+bwd"))]
    figure.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=7, frameon=False)
    figure.suptitle(f"{result['environment'].get('gpu', result['environment'].get('cpu'))}: {title}", fontsize=9)
    figure.tight_layout(rect=(0, 0.035 * -(-len(handles) // 6), 1, 1))
    figure.savefig(path)
    plt.close(figure)
