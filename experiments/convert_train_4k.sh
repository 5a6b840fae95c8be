#!/usr/bin/env bash
# A small RoBERTa converted to a 4K-token Diffuser model (hopformer.hf.convert_roberta: positions tiled to 4,096)
# and trained a few hundred masked-LM steps on one GPU: tokens/s and peak memory (experiments/convert_train_4k.py).
# No download: the RoBERTa is built at random and saved by transformers first. Writes under $OUT (default
# runs/convert_train_4k): the RoBERTa, the converted model with its tokenizer files, and convert_train_4k.json.
# Settings by environment: STEPS (300), LENGTH (4096), BATCH (8), ATTENTION (diffuser), OPTIONS ("hops=5
# block_size=64": attention options), HIDDEN / LAYERS / HEADS (256 / 4 / 4). Needs the hf extra (transformers).
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/convert_train_4k}
STEPS=${STEPS:-300}; LENGTH=${LENGTH:-4096}; BATCH=${BATCH:-8}; ATTENTION=${ATTENTION:-diffuser}
OPTIONS=${OPTIONS:-"hops=5 block_size=64"}; HIDDEN=${HIDDEN:-256}; LAYERS=${LAYERS:-4}; HEADS=${HEADS:-4}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
option_args=()
for kv in $OPTIONS; do option_args+=(--option "$kv"); done
python3 experiments/convert_train_4k.py --out "$OUT" --steps "$STEPS" --length "$LENGTH" --batch "$BATCH" \
  --attention "$ATTENTION" "${option_args[@]}" --hidden "$HIDDEN" --layers "$LAYERS" --heads "$HEADS" \
  2>&1 | tee "$OUT/convert_train_4k.log"
