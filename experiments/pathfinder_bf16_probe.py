"""Error of the GPU backends in bf16 (the training dtype) and fp32 against float64 dense, at the Pathfinder
length: output and the gradients of q, k and v, for 5-hop diffusion and one sparse attention, without and with
a key mask that keeps 22% of the tokens (as the lit-pixel mask does). Run on one H200:
``python experiments/pathfinder_bf16_probe.py`` (its table is in benchmarks/results/pathfinder_all_attentions_h200).
(Lint fixes only since it ran.)"""

import torch

import hopformer.graphs as G
from hopformer.ops import diffuse, sparse_attention

torch.manual_seed(0)
dev = "cuda"
seq, bs = 1024, 64
graph = G.diffuser(seq, bs, window=1, num_global=1, num_random=1, seed=3)
bgraph = G.bigbird(seq, bs, window=1, num_global=1, num_random=1, seed=3)
B, H, D = 4, 2, 32
q, k, v = (torch.randn(B, H, seq, D, dtype=torch.float64, device=dev) for _ in range(3))
q, k = 2 * q, 2 * k
mask = torch.rand(B, seq, device=dev) > 0.78
mask[:, 0] = True
w = torch.randn(B, H, seq, D, dtype=torch.float64, device=dev)


def run(fn, backend, dtype):
    t = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    out = fn(*t, backend)
    g = torch.autograd.grad((out.double() * w).sum(), t)
    return [out.double()] + [x.double() for x in g]


for m, name in ((None, "no mask"), (mask, "22% real")):
    cases = {
        "diffuse": lambda q, k, v, b, m=m: diffuse(q, k, v, graph, hops=5, alpha=0.1, key_padding_mask=m, backend=b),
        "sparse": lambda q, k, v, b, m=m: sparse_attention(q, k, v, bgraph, m, b),
    }
    for what, fn in cases.items():
        ref = run(fn, "dense", torch.float64)
        for backend in ("triton", "matrix"):
            for dt in (torch.float32, torch.bfloat16):
                got = run(fn, backend, dt)
                errs = [((a - b).norm() / b.norm()).item() for a, b in zip(got, ref)]
                rel = " ".join(f"{n} {e:.4f}" for n, e in zip(("out", "dq", "dk", "dv"), errs))
                print(name, what, backend, dt, rel, flush=True)
