"""Would ``torch.compile`` bring Routing and the slow Combiner variants within 2x of bigbird at 64K? (issue 42)

Their eager steps are many small kernels (per-level products, pools, scatters) whose arithmetic is far below
bigbird's. This times each core fwd+bwd eager and compiled (``fullgraph=True``, one shape), beside bigbird
``sparse_attention`` [triton], as ``hopformer bench`` builds them (bf16, batch 1, 12 heads x 64, bidirectional, no
padding; Routing in training mode with its commitment loss in the backward). Peak memory above the inputs.

    python experiments/compiled_cores_gpu.py --seq-len 65536 --out compiled_cores.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from hopformer.bench.harness import Case, _core
from hopformer.graphs import bigbird

SPECS = ["combiner:logsparse", "combiner:axial", "combiner:axial_horizontal", "combiner:mixture", "routing"]


def settings() -> dict:
    return {
        "dtype": "bfloat16", "batch": 1, "heads": 12, "head_dim": 64, "seed": 0, "pattern": "bigbird", "hops": 5,
        "alpha": 0.1, "graph_options": {"block_size": 128, "window": 3, "num_global": 2, "num_random": 3, "seed": 0},
        "routing": {}, "combiner": {"block_size": None},
    }  # fmt: skip


def measure(call, q, k, v, grad, device, repeats: int) -> dict:
    def step() -> None:
        out, loss = call()
        tensors, grads = ([out], [grad]) if loss is None else ([out, loss], [grad, torch.ones_like(loss)])
        torch.autograd.backward(tensors, grads)
        q.grad = k.grad = v.grad = None

    start = time.perf_counter()
    step()  # compiles, when compiled
    first_s = time.perf_counter() - start
    for _ in range(2):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    row = {"ms": sorted(times)[len(times) // 2], "first_call_s": round(first_s, 2)}
    if device.type == "cuda":
        row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--specs", default=",".join(SPECS))
    parser.add_argument("--out", default="compiled_cores.json")
    args = parser.parse_args()
    device, seq = torch.device(args.device), args.seq_len
    conf = settings()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    conf["dtype"] = str(dtype).removeprefix("torch.")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 12, seq, 64, device=device, dtype=dtype, requires_grad=True) for _ in "qkv")
    grad = torch.randn_like(q)
    rows = []
    if device.type == "cuda":
        from hopformer.ops import sparse_attention

        graph = bigbird(seq, 128, window=3, num_global=2, num_random=3, seed=0)
        bigbird_row = measure(lambda: (sparse_attention(q, k, v, graph, None, "triton"), None), q, k, v, grad, device,
                              args.repeats)  # fmt: skip
        rows.append({"spec": "sparse@triton (bigbird)", **bigbird_row})
        print(rows[-1], flush=True)
    for spec in args.specs.split(","):
        op, _, variant = spec.partition(":")
        for compiled in (False, True):
            torch._dynamo.reset()
            call, _ = _core(Case(op, "eager", seq, "fwd+bwd", variant or None), conf, device, q, k, v)
            if compiled:
                call = torch.compile(call, fullgraph=True, dynamic=False)
            try:
                row = measure(call, q, k, v, grad, device, args.repeats)
            except Exception as error:  # noqa: BLE001 (a probe: record what failed and go on)
                row = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            rows.append({"spec": f"{spec}@eager", "compiled": compiled, **row})
            if "ms" in row and rows[0]["spec"].startswith("sparse"):
                rows[-1]["time_over_bigbird"] = row["ms"] / rows[0]["ms"]
                rows[-1]["memory_over_bigbird"] = row.get("peak_mib", 0) / rows[0]["peak_mib"]
            print(rows[-1], flush=True)
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "seq_len": seq, "rows": rows}  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
