#!/usr/bin/env bash
# Issue 40 on one GPU (~5 minutes): the CUDA tests of cached decoding (steps replayed from a CUDA graph give exactly
# the eager tokens and logits; graph-safe eager steps pass torch.cuda.set_sync_debug_mode("error")), then the
# decoding benchmark at 4K, 16K and 64K for full, BigBird and Diffuser (cached eager, cached + CUDA graph,
# recompute) and the kernels one step launches. Writes $OUT/decode_tests.log, decode.json, decode.png, kernels.txt.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_generation.py 2>&1 | tee "$OUT/decode_tests.log" | tail -20
python3 benchmarks/decode.py --contexts 4096,16384,65536 --attentions full,bigbird,diffuser --out "$OUT/decode.json"
python3 experiments/decode_step_kernels.py 2>&1 | tee "$OUT/kernels.txt"
