"""Decoding speed: a causal LM's cost per new token with incremental caches against recomputing the full forward
pass, at several context lengths, per attention; and each cache's memory against ``(K + 2) x n x d``.

    python benchmarks/decode.py --contexts 4096,16384,65536 --attentions full,bigbird,diffuser --out decode.json

For every attention and context ``n``: a model (``--depth`` layers, ``--dim``, ``--heads``) in ``--dtype``, a prompt
of ``n`` random tokens prefilled into the caches, then ``--steps`` decoding steps timed one by one (median); the
recomputation is one full forward pass over ``n + 1`` tokens, the work ``use_cache=False`` does per token (median
of ``--repeats``). Cache memory: the bytes of each layer's cache tensors. Writes one JSON with the command,
device, versions and a row per (attention, context), and a PNG of time per token against the context.
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
    total = 0
    for cache in caches:
        for value in vars(cache).values():
            tensors = value if isinstance(value, list) else [value]
            total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - began) * 1e3


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
    total = context + args.steps + 1
    caches = model.encoder.new_caches(1, total, device, model.head.weight.dtype)
    prefill = timed(lambda: model.encoder(ids[:, :context], None, caches=caches), device)
    steps = []
    for step in range(args.steps):
        position = torch.tensor([context + step], device=device)
        steps.append(timed(lambda p=position: model.head(model.encoder.step(ids[:, p], p, caches)), device))
    full = [timed(lambda: model(ids[:, : context + 1]), device) for _ in range(args.repeats)]
    cached_ms = statistics.median(steps[2:] or steps)  # the first steps warm the kernels up
    recompute_ms = statistics.median(full[1:] or full)
    head_dim = args.dim // args.heads
    tensors = 2 + (options.get("hops", 5) if attention == "diffuser" else 0)  # keys, values and K hop states
    bound = tensors * context * args.heads * head_dim * model.head.weight.element_size() * args.depth
    return {
        "attention": attention, "context": context, "prefill_ms": prefill, "decode_ms": cached_ms,
        "recompute_ms": recompute_ms, "speedup": recompute_ms / cached_ms, "tokens_per_s": 1e3 / cached_ms,
        "cache_mib": cache_bytes(caches) / 2**20, "bound_mib": bound / 2**20,
    }  # fmt: skip


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for index, attention in enumerate(dict.fromkeys(r["attention"] for r in rows)):
        mine = sorted((r for r in rows if r["attention"] == attention and "decode_ms" in r), key=lambda r: r["context"])
        contexts = [r["context"] for r in mine]
        ax.plot(contexts, [r["decode_ms"] for r in mine], "o-", color=f"C{index}", label=f"{attention}: cached")
        ax.plot(contexts, [r["recompute_ms"] for r in mine], "o--", color=f"C{index}", label=f"{attention}: recompute")
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
    parser.add_argument("--steps", type=int, default=24, help="decoding steps timed")
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
