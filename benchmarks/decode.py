"""Decoding speed: a causal LM's cost per new token with incremental caches (eager steps, and steps replayed from a
CUDA graph) against recomputing the full forward pass, at several context lengths, per attention; and each cache's
memory against ``(K + 2) x n x d``.

    python benchmarks/decode.py --contexts 4096,16384,65536 --attentions full,bigbird,diffuser --out decode.json

For every attention and context ``n``: a model (``--depth`` layers, ``--dim``, ``--heads``) in ``--dtype``, a prompt
of ``n`` random tokens prefilled into the caches, then ``--steps`` decoding steps timed one by one (median): eager
(``generate(cuda_graph=False)``) and, on CUDA, replayed from one captured CUDA graph (``cuda_graph=True``; fresh
caches, the same tokens; the capture, which runs the first step, is timed apart, and the largest difference of the
graph's logits from the eager ones is recorded). The recomputation is one full forward pass over ``n + 1`` tokens,
the work ``use_cache=False`` does per token (median of ``--repeats``). Cache memory: the bytes of each layer's cache
tensors. Writes one JSON with the command, device, versions and a row per (attention, context), and a PNG of time
per token against the context.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hopformer.bench.harness import command_line, environment  # noqa: E402
from hopformer.models import CausalLM, CausalLMConfig, EncoderConfig  # noqa: E402

# the graph attentions decode on hopformer's kernels here: their prefill then compiles nothing per length
OPTIONS = {"full": {}, "bigbird": {"backend": "triton"}, "diffuser": {"backend": "triton", "hops": 5}}


def cache_bytes(caches) -> int:
    """The bytes of every tensor the caches hold (each storage once: some fields are views of one pool)."""
    storages = {}
    for cache in caches:
        for value in vars(cache).values():
            for tensor in value if isinstance(value, list) else [value]:
                if isinstance(tensor, torch.Tensor):
                    storage = tensor.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def timed(fn, device: torch.device) -> tuple[float, object]:
    """Milliseconds of ``fn()`` (the device's queue drained before and after), and what it returned."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - began) * 1e3, result


def decode(model, ids, context: int, steps: int, device, cuda_graph: bool) -> tuple[float, list[float], list, list]:
    """Prefill ``context`` tokens into fresh caches, then decode ``steps`` tokens one at a time: the prefill's
    milliseconds, each step's, each step's logits, and the caches."""
    caches = model.encoder.new_caches(1, ids.shape[1], device, model.head.weight.dtype)
    prefill, _ = timed(lambda: model.encoder(ids[:, :context], None, caches=caches), device)
    step = model.step_function(caches, cuda_graph=cuda_graph)
    times, logits = [], []
    for index in range(steps):
        token, position = ids[:, context + index], torch.full((1,), context + index, device=device)
        ms, out = timed(lambda t=token, p=position: step(t, p), device)
        times.append(ms)
        logits.append(out.float().clone())  # a graph's logits are a buffer the next replay overwrites
    return prefill, times, logits, caches


@torch.no_grad()
def measure(attention: str, context: int, args, device: torch.device) -> dict:
    options = {k: v for k, v in OPTIONS.get(attention, {}).items() if device.type == "cuda" or k != "backend"}
    encoder = EncoderConfig(
        256, dim=args.dim, depth=args.depth, heads=args.heads, mlp_dim=4 * args.dim, max_len=context + args.steps + 1,
        attention=attention, attention_options=options, pad_id=None, dropout=0.0, causal=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = CausalLM(CausalLMConfig(encoder)).to(device=device, dtype=getattr(torch, args.dtype)).eval()
    ids = torch.randint(0, 256, (1, context + args.steps + 1), device=device)
    prefill, steps, eager_logits, caches = decode(model, ids, context, args.steps, device, cuda_graph=False)
    memory = cache_bytes(caches)
    del caches
    full = [timed(lambda: model(ids[:, : context + 1]), device)[0] for _ in range(args.repeats)]
    cached_ms = statistics.median(steps[2:] or steps)  # the first steps warm the kernels up
    recompute_ms = statistics.median(full[1:] or full)
    head_dim = args.dim // args.heads
    tensors = 2 + (options.get("hops", 5) if attention == "diffuser" else 0)  # keys, values and K hop states
    bound = tensors * context * args.heads * head_dim * model.head.weight.element_size() * args.depth
    row = {
        "attention": attention, "context": context, "prefill_ms": prefill, "decode_ms": cached_ms,
        "recompute_ms": recompute_ms, "speedup": recompute_ms / cached_ms, "tokens_per_s": 1e3 / cached_ms,
        "cache_mib": memory / 2**20, "bound_mib": bound / 2**20,
    }  # fmt: skip
    if device.type != "cuda":
        return row
    torch.cuda.empty_cache()
    try:
        _, graph_steps, graph_logits, _ = decode(model, ids, context, args.steps, device, cuda_graph=True)
    except (RuntimeError, ValueError) as error:
        return {**row, "graph_error": str(error).splitlines()[0]}
    graph_ms = statistics.median(graph_steps[1:])  # the first call warms up and captures
    difference = max(float((a - b).abs().max()) for a, b in zip(graph_logits, eager_logits, strict=True))
    return {
        **row, "graph_ms": graph_ms, "graph_speedup": recompute_ms / graph_ms, "graph_tokens_per_s": 1e3 / graph_ms,
        "capture_ms": graph_steps[0], "graph_vs_eager_max_abs": difference,
    }  # fmt: skip


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for index, attention in enumerate(dict.fromkeys(r["attention"] for r in rows)):
        mine = sorted((r for r in rows if r["attention"] == attention and "decode_ms" in r), key=lambda r: r["context"])
        contexts = [r["context"] for r in mine]
        color = f"C{index}"
        ax.plot(contexts, [r["decode_ms"] for r in mine], "o-", color=color, label=f"{attention}: cached, eager")
        graphed = [r for r in mine if "graph_ms" in r]
        if graphed:
            where, times = [r["context"] for r in graphed], [r["graph_ms"] for r in graphed]
            ax.plot(where, times, "s-.", color=color, label=f"{attention}: cached, CUDA graph")
        ax.plot(contexts, [r["recompute_ms"] for r in mine], "o--", color=color, label=f"{attention}: recompute")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("time per new token (ms)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="4096,16384,65536", help="context lengths, comma-separated")
    parser.add_argument("--attentions", default="full,bigbird,diffuser", help="attentions, comma-separated")
    parser.add_argument("--depth", type=int, default=4, help="layers")
    parser.add_argument("--dim", type=int, default=256, help="model width")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--steps", type=int, default=24, help="decoding steps timed (each way)")
    parser.add_argument("--repeats", type=int, default=3, help="full forward passes timed")
    parser.add_argument("--dtype", default="bfloat16", help="model dtype (bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="decode.json", help="the JSON written (and a PNG beside it)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for attention in args.attentions.split(","):
        for context in (int(n) for n in args.contexts.split(",")):
            try:
                rows.append(measure(attention, context, args, device))
            except (RuntimeError, ValueError, torch.OutOfMemoryError) as error:
                rows.append({"attention": attention, "context": context, "error": str(error).splitlines()[0]})
            print(json.dumps(rows[-1]), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    record = {"command": command_line(argv), "environment": environment(device), "settings": vars(args), "rows": rows}
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    try:
        plot(rows, str(Path(args.out).with_suffix(".png")))
    except ImportError:
        pass


if __name__ == "__main__":
    main()
