"""Where Routing's 64K fwd+bwd goes, part by part, and what cheaper forms of each part would cost (issue 42).

The bench's routing row (the module's attention core in training mode, bf16, 12 heads x 64, 6 local + 6 routing
heads, 256 clusters of 256) is 3.9x bigbird sparse attention at 64K. This times, with CUDA events, each piece of
that step on the 6 routing heads, and the alternatives for the expensive ones:

- normalise: ``F.layer_norm`` of the float32 copy (what runs) against the same in fewer, larger calls;
- rank: similarity table + top-w + argmax, one head per chunk (what runs) against 2, 3 and 6 heads per chunk;
- the commitment loss forward and backward;
- the clustered attention and the local heads' attention;
- the whole step, and the whole step with the commitment loss left out.

    python experiments/routing_parts_gpu.py --seq-len 65536 --out routing_parts.json
"""

from __future__ import annotations

import argparse
import json
import time
from unittest import mock

import torch

from hopformer.attention import routing
from hopformer.attention.routing import RoutingAttention, local_attention
from hopformer.ops import routing_attention as ra

DEVICE = "cuda"


def timed(fn, repeats: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    if DEVICE == "cpu":  # a smoke run of the probe itself
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats * 1e3
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--out", default="routing_parts.json")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to check that the probe runs")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    seq, heads, dim = args.seq_len, 12, 64
    torch.manual_seed(0)
    module = RoutingAttention(heads * dim, heads, max_seq_len=seq).to(DEVICE).train()
    shape = (1, heads, seq, dim)
    q, k, v = (torch.randn(shape, device=DEVICE, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16)
    window = seq // module.clusters
    rows: dict[str, float] = {}

    def step() -> None:
        out = module.attend(q, k, v, None)
        torch.autograd.backward([out, module.aux_loss], [grad, torch.ones_like(module.aux_loss)])
        q.grad = k.grad = v.grad = None

    def step_without_commitment() -> None:
        module.attend(q, k, v, None).backward(grad)
        q.grad = k.grad = v.grad = None

    rows["step"] = timed(step)
    with mock.patch.object(routing, "commitment_loss", lambda x, *args: x.new_zeros((), dtype=torch.float32)):
        rows["step_without_commitment"] = timed(step_without_commitment)

    h = module.routing_heads
    q_route, k_route, v_route = (x.detach()[:, h:].contiguous() for x in (q, k, v))
    q_local = q.detach()[:, :h].contiguous().requires_grad_()
    centroids = module.centroids
    rows["normalise_two_tensors"] = timed(lambda: [ra.normalise(x.float()) for x in (q_route, k_route)])
    rows["normalise_two_tensors_one_call"] = timed(lambda: ra.normalise(torch.cat([q_route, k_route], 1).float()))
    x_norm = ra.normalise(q_route.float())
    rows["layer_norm_bf16_in_f32_out_manual"] = timed(
        lambda: (
            (q_route.float() - q_route.float().mean(-1, keepdim=True))
            * torch.rsqrt(q_route.float().var(-1, unbiased=False, keepdim=True) + 1e-5)
        )
    )
    for per_chunk in (1, 2, 3, 6):
        with mock.patch.object(ra, "TABLE_ELEMENTS", per_chunk * seq * module.clusters):
            rows[f"rank_one_tensor_{per_chunk}_heads_per_chunk"] = timed(
                lambda: ra.rank(x_norm, centroids, window, None)
            )
    table = ra.similarity(x_norm[:, :1], centroids[:1])
    rows["similarity_one_head"] = timed(lambda: ra.similarity(x_norm[:, :1], centroids[:1]))
    rows["topk_one_head"] = timed(lambda: table.topk(window, dim=-1))
    rows["topk_sort_one_head"] = timed(lambda: table.topk(window, dim=-1).indices.sort(dim=-1))
    rows["argmax_one_head"] = timed(lambda: table.argmax(2))
    rows["max_one_head"] = timed(lambda: table.max(2))
    members, assignment, error = ra.rank(x_norm, centroids, window, None)

    x = q_route.clone().requires_grad_()

    def commitment_forward():
        return ra.commitment_loss(x, centroids, assignment)

    def commitment_both():
        ra.commitment_loss(x, centroids, assignment).backward()
        x.grad = None

    rows["commitment_forward_one_tensor"] = timed(commitment_forward)
    rows["commitment_forward_one_tensor_from_ranking_error"] = timed(
        lambda: ra.commitment_loss(x, centroids, assignment, error=error)
    )
    rows["commitment_fwd_bwd_one_tensor"] = timed(commitment_both)
    rows["record_statistics_two_tensors"] = timed(
        lambda: routing.record_statistics(module._state(), [(x_norm, assignment), (x_norm, assignment)], None)
    )
    qr, kr, vr = (t.clone().requires_grad_() for t in (q_route, k_route, v_route))

    def clustered():
        out = ra.clustered_attention(qr, kr, vr, members, members, False, None)
        out.backward(grad[:, h:])
        qr.grad = kr.grad = vr.grad = None

    rows["clustered_attention_fwd_bwd"] = timed(clustered)
    kl, vl = (t.detach()[:, :h].contiguous().requires_grad_() for t in (k, v))

    def local():
        out = local_attention(q_local, kl, vl, module.local_window)
        out.backward(grad[:, :h])
        q_local.grad = kl.grad = vl.grad = None

    rows["local_attention_fwd_bwd"] = timed(local)
    for name, ms in rows.items():
        print(f"{ms:8.3f} ms  {name}")
    info = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__,
        "seq_len": seq,
        "ms": rows,
    }
    with open(args.out, "w") as f:
        json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
