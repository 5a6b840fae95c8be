"""One-call GPU exploration: flex backend correctness, recompile guard, and kernel-option timings.

python benchmarks/scripts/gpu_explore.py  (on the H200; prints a table, writes $OUT/explore.json)
"""
import json, os, time, traceback
import torch
import torch.nn.functional as F
from triton.testing import do_bench
import hopformer.graphs as G
from hopformer.ops import sparse_attention, diffuse
from hopformer.ops import flex as FB

res = {"torch": torch.__version__, "device": torch.cuda.get_device_name()}
dev = "cuda"
torch.manual_seed(0)

def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()

# 1. correctness vs gather on GPU (fp32 inputs; flex runs in tf32-ish precision)
corr = []
for name, g in [("bigbird128", G.bigbird(1000, 128)), ("bigbird64c", G.bigbird(1000, 64, causal=True)),
                ("hyper16", G.hypercube(700, 16)), ("local128", G.local(1024, 128))]:
    for pad in (False, True):
        S = g.seq_len
        q, k, v = (torch.randn(2, 4, S, 64, device=dev, requires_grad=True) for _ in range(3))
        kpm = None
        if pad:
            kpm = torch.ones(2, S, dtype=torch.bool, device=dev); kpm[0, S // 3:] = False; kpm[1, ::7] = False
        for fn in ("sa", "df"):
            outs = {}
            for be in ("gather", "flex"):
                o = sparse_attention(q, k, v, g, kpm, be) if fn == "sa" else diffuse(q, k, v, g, 5, 0.1, kpm, be)
                gw = torch.randn_like(o, generator=None) if be == "gather" else outs["gather"][-1]
                grads = torch.autograd.grad(o, (q, k, v), gw)
                outs[be] = (o, *grads, gw)
            errs = [rel(a, b) for a, b in zip(outs["flex"][:4], outs["gather"][:4])]
            corr.append((name, pad, fn, errs))
            print("corr", name, pad, fn, ["%.2e" % e for e in errs], flush=True)
res["correctness"] = corr

# 2. recompile guard: varying padding values, same shapes, 12 calls
try:
    g = G.bigbird(2048, 128)
    q, k, v = (torch.randn(4, 4, 2048, 64, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    for i in range(12):
        kpm = torch.arange(2048, device=dev)[None, :] < torch.randint(500, 2048, (4, 1), device=dev)
        o = sparse_attention(q, k, v, g, kpm, "flex"); o.sum().backward()
    res["recompile_varying_padding"] = "ok"
except Exception as e:
    res["recompile_varying_padding"] = repr(e)[:500]
print("recompile", res["recompile_varying_padding"], flush=True)

# 3. timings at 131072
S, H, D = 131072, 12, 64
g = G.bigbird(S, 128, window=3, num_global=2, num_random=3)
q, k, v = (torch.randn(1, H, S, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
go = torch.randn(1, H, S, D, device=dev, dtype=torch.bfloat16)
mask = FB.block_mask(g, None, q.device)
timings = {}

def bench(label, fn, fwd_only=False):
    try:
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
        def step():
            o = fn()
            if not fwd_only:
                torch.autograd.backward(o, go)
            return o
        step()
        t = do_bench(step, warmup=50, rep=300, return_mode="median")
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        timings[label] = (t, peak)
        print(f"{label:55s} {t:8.3f} ms  peak {peak:6.2f} GiB", flush=True)
    except Exception as e:
        timings[label] = repr(e)[:300]
        print(label, "FAILED", repr(e)[:300], flush=True)
    q.grad = k.grad = v.grad = None

with torch.no_grad():
    bench("flex sparse fwd (default)", lambda: sparse_attention(q, k, v, g, backend="flex"), True)
bench("flex sparse fwd+bwd (default)", lambda: sparse_attention(q, k, v, g, backend="flex"))
for opts in [{"BLOCK_M": 128, "BLOCK_N": 128}, {"BLOCK_M": 128, "BLOCK_N": 64}, {"BLOCK_M": 64, "BLOCK_N": 128},
             {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8}, {"BLOCK_M": 128, "BLOCK_N": 64, "num_stages": 2, "num_warps": 4},
             {"BLOCK_M1": 64, "BLOCK_N1": 128, "BLOCK_M2": 128, "BLOCK_N2": 64},
             {"BACKEND": "FLASH"}, {"BACKEND": "TRITON"}]:
    bench(f"flex sparse fwd+bwd {opts}", lambda: sparse_attention(q, k, v, g, backend="flex", kernel_options=opts))
bench("diffuse flex 5 hops fwd+bwd (loop)", lambda: diffuse(q, k, v, g, 5, 0.1, backend="flex"))
# dense SDPA reference at same length
bench("SDPA dense fwd+bwd (cuDNN default)", lambda: F.scaled_dot_product_attention(q, k, v))
# plain flex with create_block_mask from a mask_mod (what a user would write)
try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    adj = g.block_adjacency(dev)
    def mm(b, h, qi, ki):
        return adj[qi // 128, ki // 128]
    cbm = torch.compile(create_block_mask)
    plain_mask = cbm(mm, None, None, S, S, device=dev)
    plain = torch.compile(flex_attention, dynamic=False)
    bench("plain compiled flex (create_block_mask) fwd+bwd", lambda: plain(q, k, v, block_mask=plain_mask))
    def loop():
        z = v
        for _ in range(5):
            z = 0.9 * plain(q, k, z, block_mask=plain_mask) + 0.1 * v
        return z
    bench("plain loop of flex 5 hops fwd+bwd", loop)
    mx = torch.compile(flex_attention, dynamic=False, mode="max-autotune-no-cudagraphs")
    bench("max-autotune flex fwd+bwd", lambda: mx(q, k, v, block_mask=plain_mask))
except Exception:
    traceback.print_exc()
res["timings"] = timings
os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "explore.json"), "w"), indent=1, default=str)
