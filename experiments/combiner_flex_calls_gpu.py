"""Why Combiner's axial flex path is slow: its FlexAttention calls one by one, and the row call's mask_mod
written several ways, beside FlexAttention's own block-diagonal call of the same reach, at 64K tokens, bf16,
12 heads x 64, width 256.

    python experiments/combiner_flex_calls_gpu.py
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import create_block_mask
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

from hopformer.ops import combiner_flex, flex

SEQ, HEADS, DIM, WIDTH = 65536, 12, 64, 256


def main() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, SEQ, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qkv")
    grad = torch.randn_like(q)
    real = torch.ones(1, SEQ, dtype=torch.bool, device="cuda")
    scale = DIM**-0.5

    def timed(name, call):
        fwd = do_bench(lambda: call(), warmup=5, rep=40, return_mode="median")

        def step():
            out = call()
            out = out[0] if isinstance(out, tuple) else out
            out.backward(grad)
            q.grad = k.grad = v.grad = None

        both = do_bench(step, warmup=5, rep=40, return_mode="median")
        print(f"{name:64s} fwd {fwd:7.3f} ms   fwd+bwd {both:7.3f} ms", flush=True)

    codes = combiner_flex._group_tile_codes(SEQ // 128, WIDTH, SEQ, "all", False, "cuda")
    key_ok = real
    key_ok_int = real.to(torch.int32)
    masks = {
        "key_ok & group & rule (current)": lambda b, h, i, j: key_ok[b, j] & (j // WIDTH == i // WIDTH) & (i >= 0),
        "key_ok int32": lambda b, h, i, j: (key_ok_int[b, j] > 0) & (j // WIDTH == i // WIDTH),
        "group only": lambda b, h, i, j: j // WIDTH == i // WIDTH,
    }
    for name, mask_mod in masks.items():
        block = flex.block_mask_from_codes(codes[None], mask_mod, SEQ, SEQ)
        timed(
            f"row call, partial tiles: {name}",
            lambda block=block: flex.run_flex(q, k, v, block, scale, return_lse=True),
        )
        full = flex.block_mask_from_codes(codes[None] * 2, mask_mod, SEQ, SEQ)
        timed(f"row call, full tiles: {name}", lambda full=full: flex.run_flex(q, k, v, full, scale, return_lse=True))
    plain = create_block_mask(masks["group only"], 1, 1, SEQ, SEQ, device="cuda", BLOCK_SIZE=128)
    timed("create_block_mask block-diagonal, lse", lambda: flex.run_flex(q, k, v, plain, scale, return_lse=True))
    for rule in ("all", "others"):
        for name, ok in (("key mask, partial tiles", real), ("no key mask, full tiles", None)):
            timed(
                f"_group_attention rule={rule}, {name}",
                lambda rule=rule, ok=ok: combiner_flex._group_attention(
                    q, k, v, ok, WIDTH, rule, scale=scale, dense=False
                ),
            )

    for variant in ("axial", "mixture", "fixed"):
        for name, ok in (("all-real key mask (partial tiles)", real), ("no mask (full tiles)", None)):

            def call(variant=variant, ok=ok):
                return combiner_flex.FLEX.combine(q, k, v, variant, WIDTH, False, ok, scale, 0.0)

            timed(f"combiner {variant} flex, {name}", call)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            call().backward(grad)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
        total = sum(e.time_range.elapsed_us() for e in kernels) / 1e3
        span = (max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)) / 1e3
        print(f"  {variant}: {len(kernels)} kernels, {total:.2f} ms busy in a {span:.2f} ms span")
        for e in kernels:
            if "flex" in e.name or e.time_range.elapsed_us() > 300:
                print(f"  {e.time_range.elapsed_us() / 1e3:7.3f} ms  {e.name[:90]}")


if __name__ == "__main__":
    main()
