"""Launch options (warps x pipeline stages) of the triton backend's kernels at tile 128, one kernel at a time, timed
on the step each one serves: ``first`` and ``dqdk`` on ``sparse_attention``, ``pass`` and ``dqdk`` on 5-hop
``diffuse``; fwd+bwd at 131K tokens, bf16, batch 1, 12 heads x 64, the README's bigbird graph. Median ms per
configuration; the current ``LAUNCH`` entry is marked.

    python experiments/triton_launch_tune_gpu.py --out launch_tune.json
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from triton.testing import do_bench

import hopformer.graphs as G
from hopformer.ops import diffuse, sparse_attention
from hopformer.ops import triton_diffusion as T

CONFIGS = [{"num_warps": w, "num_stages": s} for w, s in itertools.product((4, 8), (2, 3, 4))]
TUNED = (("first", "sparse"), ("dqdk", "sparse"), ("pass", "diffuse"), ("dqdk", "diffuse"))


def step_ms(op: str, seq_len: int) -> float:
    graph = G.bigbird(seq_len, 128, window=3, num_global=2, num_random=3, seed=0)
    q, k, v = (torch.randn(1, 12, seq_len, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qkv")
    grad = torch.randn_like(q)

    def step() -> None:
        if op == "sparse":
            out = sparse_attention(q, k, v, graph, None, "triton")
        else:
            out = diffuse(q, k, v, graph, hops=5, alpha=0.1, backend="triton")
        out.backward(grad)
        q.grad = k.grad = v.grad = None

    return do_bench(step, warmup=3, rep=30, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=131072)
    parser.add_argument("--out", default="launch_tune.json")
    args = parser.parse_args()
    default = dict(T.LAUNCH)
    rows = []
    for kernel, op in TUNED:
        current = default.get((kernel, 128))
        for config in CONFIGS:
            T.LAUNCH = default | {(kernel, 128): config}
            ms = step_ms(op, args.seq_len)
            rows.append({"kernel": kernel, "op": op, **config, "ms": ms, "current": config == current})
            mark = "  (current)" if config == current else ""
            print(f"{kernel:6s} on {op:8s} {config}: {ms:8.3f} ms{mark}", flush=True)
        T.LAUNCH = default
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
