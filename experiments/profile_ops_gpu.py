"""Where the time of one fwd+bwd step goes, per CUDA kernel, for the ops of ``hopformer bench`` (issue 42).

Each spec ``op[:variant]@backend`` is built as the bench builds it (bf16, batch 1, 12 heads x 64, the README's
bigbird graph, Combiner's default block), warmed up, then one step is profiled. Prints the step's CUDA time and the
top kernels by self CUDA time, and writes them all to ``--out`` (JSON).

    python experiments/profile_ops_gpu.py --seq-len 65536 combiner:axial@flex combiner:axial@eager sparse@triton
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

from hopformer.bench.harness import Case, _core


def settings() -> dict:
    return {
        "dtype": "bfloat16",
        "batch": 1,
        "heads": 12,
        "head_dim": 64,
        "seed": 0,
        "pattern": "bigbird",
        "hops": 5,
        "alpha": 0.1,
        "graph_options": {"block_size": 128, "window": 3, "num_global": 2, "num_random": 3, "seed": 0},
        "routing": {},
        "combiner": {"block_size": None},
    }


def profile_spec(spec: str, seq_len: int, top: int) -> dict:
    name, backend = spec.split("@")
    op, _, variant = name.partition(":")
    conf = settings()
    shape = (1, conf["heads"], seq_len, conf["head_dim"])
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    call, _ = _core(Case(op, backend, seq_len, "fwd+bwd", variant or None), conf, torch.device("cuda"), q, k, v)

    def step() -> None:
        out, loss = call()
        tensors, grads = ([out], [grad]) if loss is None else ([out, loss], [grad, torch.ones_like(loss)])
        torch.autograd.backward(tensors, grads)
        q.grad = k.grad = v.grad = None

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    events.sort(key=lambda e: -e.self_device_time_total)
    total_ms = sum(e.self_device_time_total for e in events) / 1e3
    kernels = [{"name": e.key[:120], "calls": e.count, "ms": e.self_device_time_total / 1e3} for e in events[:top]]
    print(f"\n== {spec} L={seq_len}: {total_ms:.2f} ms of CUDA kernels, {len(events)} kinds")
    for kernel in kernels:
        print(f"{kernel['ms']:8.3f} ms {kernel['calls']:5d}x  {kernel['name']}")
    return {"spec": spec, "seq_len": seq_len, "cuda_ms": total_ms, "kernels": kernels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("specs", nargs="+", help="op[:variant]@backend, e.g. combiner:axial@flex, sparse@triton")
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", default="profile_ops.json")
    args = parser.parse_args()
    results = [profile_spec(spec, args.seq_len, args.top) for spec in args.specs]
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
