#!/usr/bin/env bash
# diffuser hops probe on short ListOps (the setting of benchmarks/results/listops_global_probe_cpu), 2 runs at a time, 1 thread each
# data first: hopformer data listops --out /tmp/lo/short/listops-1000 --train 20000 --val 1000 --test 1000 --min-length 50 --max-length 250
cd "$(dirname "$0")/.."  # the repository root
mkdir -p /tmp/lo/hops
run() {  # name seed options...
  local name=$1 seed=$2
  shift 2
  python -m hopformer.cli train --config configs/lra/listops_pytorch_long.yaml --data-dir /tmp/lo/short --attention diffuser \
    --attention-option block_size=16 --attention-option "global_blocks=[0,5]" "$@" \
    --set data.max_length=256 --steps 8000 --seed $seed --set train.threads=1 --set train.eval_every=500 --device cpu \
    --no-progress --run-dir /tmp/lo/hops/$name > /tmp/lo/hops/$name.log 2>&1
}
run hops1-s0 0 --attention-option hops=1 & run hops2-s0 0 --attention-option hops=2 & wait
run hops1-s1 1 --attention-option hops=1 & run hops2-s1 1 --attention-option hops=2 & wait
run learned-s0 0 --attention-option learned_coefficients=true & run learned-s1 1 --attention-option learned_coefficients=true & wait
# later (2026-11-25, at 2a1ab02): the learned weights with their own learning rate, 30x optim.lr
run learned-lr30-s0 0 --attention-option learned_coefficients=true --set optim.hop_lr_scale=30 &
run learned-lr30-s1 1 --attention-option learned_coefficients=true --set optim.hop_lr_scale=30 & wait
