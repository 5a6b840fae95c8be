#!/usr/bin/env bash
# One device call: backend explanations on CUDA, the 131K benchmark of the code before the house moves
# (.old/, carried) beside the code now, and the long-sequence rows of the Triton crash (768K-4M tokens).
# Usage on the device: bash experiments/device_house_check.sh  (writes under $OUT)
set -uo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 - <<'PY' 2>&1 | tee "$OUT/explain_cuda.txt"
import torch
import hopformer.graphs as G
from hopformer.ops import explain
big = G.bigbird(131072, 128, window=3, num_global=2, num_random=3, seed=0)
q = torch.randn(1, 12, 131072, 64, device="cuda", dtype=torch.bfloat16)
print(explain(q, big, op="diffuse", hops=5), end="\n\n")
print(explain(q, big, op="sparse_attention"), end="\n\n")
small = G.bigbird(1024, 64, seed=0)
print(explain(torch.randn(2, 4, 1024, 32, device="cuda", dtype=torch.float64), small, op="diffuse"), end="\n\n")
print(explain(q, op="combiner", variant="fixed"))
PY
COMMON="--device cuda --heads 12 --head-dim 64 --block-size 128 --window 3 --num-global 2 --num-random 3 --hops 5 --modes fwd+bwd --repeats 5 --warmup 2"
PYTHONPATH=.old python3 -m hopformer.cli bench $COMMON --seq-lens 131072 --ops sparse,diffuse --backends flex,triton --out "$OUT/bench_131k_before.json" | tail -4
python3 -m hopformer.cli bench $COMMON --seq-lens 131072 --ops sparse,diffuse --backends flex,triton --out "$OUT/bench_131k_after.json" | tail -4
BIG=$(python3 -c "import torch; print(4194304 if torch.cuda.get_device_properties(0).total_memory > 100e9 else 2097152)")
python3 -m hopformer.cli bench $COMMON --seq-lens 786432,1048576,$BIG --ops sparse,diffuse --backends flex,triton --repeats 3 --warmup 1 --out "$OUT/bench_long.json" | tail -12
