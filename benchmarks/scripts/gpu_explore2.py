"""GPU exploration 2: adjoint flex diffusion vs the hop loop, kernel options, baselines, 1M tokens."""
import faulthandler, json, os, sys, traceback
faulthandler.dump_traceback_later(150, repeat=True, file=sys.stderr)
import torch
import torch.nn.functional as F
from triton.testing import do_bench
import hopformer.graphs as G
from hopformer.ops import sparse_attention, diffuse, mixing_weights, diffusion_coefficients
from hopformer.ops import flex as FB

dev = "cuda"; OUT = os.environ.get("OUT", "/tmp"); res = {}
steps = mixing_weights(diffusion_coefficients(5, 0.1))
def rel(a, b): return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()

# correctness of the adjoint flex diffusion against gather (fp32)
for name, g in [("bigbird128", G.bigbird(1000, 128)), ("bigbird64c", G.bigbird(1000, 64, causal=True)), ("hyper16", G.hypercube(700, 16))]:
    for pad in (False, True):
        S = g.seq_len
        q, k, v = (torch.randn(2, 4, S, 64, device=dev, requires_grad=True) for _ in range(3))
        kpm = None
        if pad:
            kpm = torch.ones(2, S, dtype=torch.bool, device=dev); kpm[0, S // 3:] = False; kpm[1, ::7] = False
        ref = diffuse(q, k, v, g, 5, 0.1, kpm, "gather"); gw = torch.randn_like(ref)
        rg = torch.autograd.grad(ref, (q, k, v), gw)
        mask = FB.block_mask(g, kpm, q.device)
        o = FB.flex_diffusion(q, k, v, mask, steps, 64 ** -0.5)
        if kpm is not None: o = o * kpm[:, None, :, None]
        og = torch.autograd.grad(o, (q, k, v), gw)
        errs = [rel(a, b) for a, b in zip((o, *og), (ref, *rg))]
        print("adjoint corr", name, pad, ["%.1e" % e for e in errs], flush=True)
        res.setdefault("adjoint_corr", []).append((name, pad, errs))

# recompiles with varying padding
from torch._dynamo.utils import counters
g = G.bigbird(2048, 128)
q, k, v = (torch.randn(4, 4, 2048, 64, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
before = None
for i in range(12):
    kpm = torch.arange(2048, device=dev)[None, :] < torch.randint(500, 2048, (4, 1), device=dev)
    sparse_attention(q, k, v, g, kpm, "flex").sum().backward()
    if i == 1: before = dict(counters["stats"])
res["recompile"] = {"after_2": before, "after_12": dict(counters["stats"])}
print("recompile stats", res["recompile"], flush=True)

timings = {}
def bench(label, fn, go, fwd_only=False, rep=200):
    try:
        torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
        def step():
            o = fn()
            if not fwd_only: torch.autograd.backward(o, go)
        step(); torch.cuda.synchronize()
        t = do_bench(step, warmup=25, rep=rep, return_mode="median")
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        timings[label] = (t, peak); print(f"{label:60s} {t:9.3f} ms  peak {peak:6.2f} GiB", flush=True)
    except Exception as e:
        timings[label] = repr(e)[:300]; print(label, "FAILED", repr(e)[:400], flush=True)

for S in (131072,):
    g = G.bigbird(S, 128, window=3, num_global=2, num_random=3)
    q, k, v = (torch.randn(1, 12, S, 64, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    go = torch.randn_like(q)
    mask = FB.block_mask(g, None, q.device); sc = 64 ** -0.5
    with torch.no_grad():
        bench(f"{S} flex sparse fwd", lambda: sparse_attention(q, k, v, g, backend="flex"), go, True)
    bench(f"{S} flex sparse fwd+bwd", lambda: sparse_attention(q, k, v, g, backend="flex"), go)
    for opts in [{"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8}, {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
                 {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}, {"BACKEND": "FLASH"}]:
        bench(f"{S} flex sparse fwd+bwd {opts}", lambda: sparse_attention(q, k, v, g, backend="flex", kernel_options=opts), go)
    bench(f"{S} diffuse loop fwd+bwd", lambda: diffuse(q, k, v, g, 5, 0.1, backend="flex"), go)
    bench(f"{S} diffuse adjoint fwd+bwd", lambda: FB.flex_diffusion(q, k, v, mask, steps, sc), go)
    with torch.no_grad():
        bench(f"{S} diffuse fwd only", lambda: FB.flex_diffusion(q, k, v, mask, steps, sc), go, True)
        tm = FB.transposed_mask(mask); _, lse = FB._compiled_flex_lse()(q, k, v, mask, sc, None)
        bench(f"{S} one transposed pass", lambda: FB._compiled_flex_transposed()(k, q, v, lse, tm, sc, None), go, True)
    vc = torch.randn(1, 12, S, 320, device=dev, dtype=torch.bfloat16, requires_grad=True)
    bench(f"{S} wide-V (320) fwd+bwd", lambda: FB.flex_apply(q, k, vc, mask, sc), torch.randn_like(vc))
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        adj = g.block_adjacency(dev)
        def mm(b, h, qi, ki): return adj[qi // 128, ki // 128]
        with torch._dynamo.config.patch(recompile_limit=64):
            plain_mask = torch.compile(create_block_mask)(mm, None, None, S, S, device=dev)
            plain = torch.compile(flex_attention, dynamic=False)
            bench(f"{S} plain compiled flex fwd+bwd", lambda: plain(q, k, v, block_mask=plain_mask), go)
            def loop():
                z = v
                for _ in range(5): z = 0.9 * plain(q, k, z, block_mask=plain_mask) + 0.1 * v
                return z
            bench(f"{S} plain loop 5 hops fwd+bwd", loop, go)
    except Exception:
        traceback.print_exc()
    bench(f"{S} SDPA dense fwd+bwd", lambda: F.scaled_dot_product_attention(q, k, v), go, rep=50)
    del q, k, v, go

S = 1 << 20
g = G.bigbird(S, 128, window=3, num_global=2, num_random=3)
q, k, v = (torch.randn(1, 12, S, 64, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
go = torch.randn_like(q); mask = FB.block_mask(g, None, q.device)
bench(f"{S} diffuse loop fwd+bwd", lambda: diffuse(q, k, v, g, 5, 0.1, backend="flex"), go, rep=50)
bench(f"{S} diffuse adjoint fwd+bwd", lambda: FB.flex_diffusion(q, k, v, mask, steps, 64 ** -0.5), go, rep=50)
res["timings"] = timings
json.dump(res, open(os.path.join(OUT, "explore2.json"), "w"), indent=1, default=str)
