#!/usr/bin/env bash
# diffuser alpha probe on short ListOps, 2 runs at a time, 1 thread each
# data first: hopformer data listops --out /tmp/lo/short/listops-1000 --train 20000 --val 1000 --test 1000 --min-length 50 --max-length 250
cd "$(dirname "$0")/.."  # the repository root
run() {  # name alpha seed
  python -m hopformer.cli train --config configs/lra/listops_pytorch_long.yaml --data-dir /tmp/lo/short --attention diffuser \
    --attention-option block_size=16 --attention-option "global_blocks=[0,5]" --attention-option alpha=$2 \
    --set data.max_length=256 --steps 8000 --seed $3 --set train.threads=1 --set train.eval_every=500 --device cpu \
    --no-progress --run-dir /tmp/lo/alpha/$1 > /tmp/lo/alpha/$1.log 2>&1
}
run alpha0.5-s0 0.5 0 & run alpha0.3-s0 0.3 0 & wait
run alpha0.5-s1 0.5 1 & run alpha0.3-s1 0.3 1 & wait
