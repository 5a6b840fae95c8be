"""How many CUDA kernels one cached decoding step launches, per attention, and what they are (the step is
launch-bound at small models: its time is about kernels x launch cost eagerly, kernels x a few microseconds
replayed from a CUDA graph).

    python experiments/decode_step_kernels.py --attentions full,bigbird,diffuser --context 4096

The model is benchmarks/decode.py's (4 layers, dim 256, 4 heads, bf16; BigBird and Diffuser on Triton).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hopformer.models import CausalLM, CausalLMConfig, EncoderConfig  # noqa: E402

OPTIONS = {"full": {}, "bigbird": {"backend": "triton"}, "diffuser": {"backend": "triton", "hops": 5}}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attentions", default="full,bigbird,diffuser")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--top", type=int, default=12, help="kernel names listed per attention")
    args = parser.parse_args()
    device = torch.device("cuda")
    for attention in args.attentions.split(","):
        encoder = EncoderConfig(
            256, dim=256, depth=4, heads=4, mlp_dim=1024, max_len=args.context + 64, attention=attention,
            attention_options=OPTIONS[attention], pad_id=None, dropout=0.0, causal=True,
        )  # fmt: skip
        torch.manual_seed(0)
        model = CausalLM(CausalLMConfig(encoder)).to(device=device, dtype=torch.bfloat16).eval()
        ids = torch.randint(0, 256, (1, args.context + 64), device=device)
        timings = {}
        for graphed in (False, True):
            caches = model.encoder.new_caches(1, ids.shape[1], device, torch.bfloat16)
            model.encoder(ids[:, : args.context], None, caches=caches)
            step = model.step_function(caches, cuda_graph=graphed)
            times = []
            for index in range(30):
                p = torch.full((1,), args.context + index, device=device)
                token = ids[:, args.context + index]
                torch.cuda.synchronize()
                began = time.perf_counter()
                step(token, p)
                torch.cuda.synchronize()
                times.append((time.perf_counter() - began) * 1e3)
            timings["graph" if graphed else "eager"] = statistics.median(times[5:])
            if not graphed:
                p = torch.full((1,), args.context + 40, device=device)
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    step(ids[:, args.context + 40], p)
                    torch.cuda.synchronize()
                kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
                names = collections.Counter(e.name[:70] for e in kernels)
                busy = sum(e.device_time for e in kernels) / 1e3
        print(
            f"{attention}: {len(kernels)} kernels per step ({len(kernels) / 4:.0f} per layer), GPU busy {busy:.3f} ms; "
            f"eager {timings['eager']:.3f} ms, CUDA graph {timings['graph']:.3f} ms"
        )
        for name, count in names.most_common(args.top):
            print(f"   {count:4d}  {name}")


if __name__ == "__main__":
    main()
