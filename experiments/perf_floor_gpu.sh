#!/usr/bin/env bash
# Issue 42's tables on one GPU: sparse_attention and 5-hop diffuse (triton, flex) beside PyTorch's own
# flex_attention (Inductor's kernel and the FLASH backend) and dense SDPA, whose rate gives each row's FLOP floor
# (hopformer bench's "floors"), at 4K, 16K, 131K and 1M tokens, forward and forward+backward; then Routing and
# every Combiner variant at 64K (eager, and flex where it runs) beside bigbird sparse attention; and, on a GPU
# with over 100 GB, diffuse at 4M.
# bf16, batch 1, 12 heads x 64, the README's bigbird graph (block 128, window 3, 2 global, 3 random).
# Writes the bench JSONs and PNGs under $OUT. Arguments pick the parts (default: all, in this order):
#   tests  Combiner's FlexAttention paths on CUDA against eager float64
#   cuda   the CUDA tests of the Triton backend, the custom ops and Combiner (after a change to them)
#   long   sparse_attention and diffuse (triton, flex) fwd+bwd at 131K and 1M: time and peak memory
#   4m     diffuse [triton] at 4,194,304 tokens (only on a GPU with over 100 GB)
#   64k    Routing and every Combiner variant at 65,536 tokens beside bigbird sparse attention
#   compiled  the same cores (but Fixed) eager and under torch.compile (hopformer bench --compile)
#   floor  the floor tables at 4K, 16K, 131K and 1M
#   ab     before/after: sparse_attention and diffuse [triton] at 131K and 1M, Routing, Combiner-Logsparse, the axial
#          forms and mixture (eager and flex) at 64K, run
#          from $BEFORE (a copy of the code to compare with) and from this tree, one after the other; and the
#          Triton backend's 2^31-element test in both. Make $BEFORE here and carry it (it is git-ignored):
#            mkdir -p experiments/_before && git archive be6b7fe hopformer tests pyproject.toml | tar -x -C experiments/_before
#          AB_QUICK=1 leaves the 2^31 test out; AB_LENS=131072 times the triton rows at 131K only; AB_VARIANTS
#          picks the Combiner variants at 64K.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/perf_floor}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
G=(--heads 12 --head-dim 64 --block-size 128 --window 3 --num-global 2 --num-random 3 --batch 1 --dtype bfloat16)
PARTS=("$@"); [ ${#PARTS[@]} -eq 0 ] && PARTS=(tests 4m 64k floor)
workers=(); python3 -c "import xdist" 2>/dev/null && workers=(-n 8)  # pytest-xdist, where the image has it
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for part in "${PARTS[@]}"; do
  echo "== $part $(date +%T)"
  case $part in
  tests)
    python3 -m pytest -q -m cuda tests/test_combiner.py -k flex -p no:cacheprovider "${workers[@]}" 2>&1 | tail -5 \
      | tee "$OUT/combiner_flex_tests.txt" ;;
  cuda)
    # the 2^31-element test holds about 30 GB: alone, not beside parallel workers
    { python3 -m pytest -q -m cuda tests/test_triton_backend.py -k offsets -p no:cacheprovider 2>&1 | tail -3
      python3 -m pytest -q -m cuda tests/test_triton_backend.py tests/test_combiner.py -k "not offsets" \
        -p no:cacheprovider "${workers[@]}" 2>&1 | tail -3
      python3 -m pytest -q tests/test_compile.py -k "triton or side_outputs or gather" -p no:cacheprovider 2>&1 \
        | tail -3; } | tee "$OUT/cuda_tests.txt" ;;
  long)
    python3 -m hopformer bench "${G[@]}" --seq-lens 131072,1048576 --ops sparse,diffuse --backends triton,flex \
      --modes fwd+bwd --repeats 3 --warmup 1 --out "$OUT/bench_long.json" | grep -v "^|" ;;
  4m)
    memory=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
    if [ "${memory:-0}" -gt 100000 ]; then
      python3 -m hopformer bench "${G[@]}" --seq-lens 4194304 --ops sparse,diffuse --backends triton \
        --modes fwd+bwd --repeats 2 --warmup 1 --out "$OUT/bench_4m.json" | grep -v "^|"
    else
      echo "4m: skipped, ${memory} MiB of GPU memory (needs over 100 GB)"
    fi ;;
  64k)
    python3 -m hopformer bench "${G[@]}" --seq-lens 65536 --ops sparse,routing,combiner --backends triton \
      --combiner-variants all --modes fwd+bwd --repeats 3 --warmup 1 --time-limit-s 150 \
      --out "$OUT/bench_64k.json" | grep -v "^|" ;;
  compiled)
    python3 -m hopformer bench "${G[@]}" --seq-lens 65536 --ops sparse,routing,combiner --backends triton \
      --combiner-variants logsparse,axial,axial_horizontal,mixture --modes fwd+bwd --compile --repeats 3 --warmup 1 \
      --time-limit-s 400 --out "$OUT/bench_64k_compiled.json" | grep -v "^|" ;;
  floor)
    python3 -m hopformer bench "${G[@]}" --seq-lens 4096,16384,131072,1048576 --sdpa-max-len 131072 \
      --ops sdpa,sparse,diffuse --backends triton,flex,flexattention,flexattention-flash --modes fwd,fwd+bwd \
      --repeats 5 --warmup 2 --time-limit-s "${FLOOR_LIMIT:-200}" --out "$OUT/bench_floor.json" | grep -v "^|" ;;
  ab)
    here=$PWD
    for side in before after; do
      code=$here
      if [ $side = before ]; then code=${BEFORE:-experiments/_before}; [[ $code = /* ]] || code=$here/$code; fi
      echo "-- $side: $code"
      # python -m puts the working directory first on sys.path: run from the copy, or it tests this tree twice
      ( cd "$code" && export PYTHONPATH=$code
        [ -z "${AB_QUICK:-}" ] && timeout 150 python3 -m pytest -q tests/test_triton_backend.py -k offsets \
          -p no:cacheprovider 2>&1 | grep -E "Mismatch|Greatest|Error|passed|failed" | head -8
        python3 -m hopformer bench "${G[@]}" --seq-lens "${AB_LENS:-131072,1048576}" --sdpa-max-len 131072 --ops sdpa,sparse,diffuse \
          --backends triton --modes fwd+bwd --repeats 5 --warmup 2 --out "$OUT/bench_ab_$side.json" | grep -E "floor|MiB"
        python3 -m hopformer bench "${G[@]}" --seq-lens 65536 --ops sparse,routing,combiner --backends triton \
          --combiner-variants "${AB_VARIANTS:-logsparse,axial,axial_horizontal,mixture}" --modes fwd+bwd --repeats 3 \
          --warmup 1 --time-limit-s 200 --out "$OUT/bench_ab64_$side.json" \
          | grep MiB )
    done ;;
  *) echo "unknown part: $part (tests, cuda, long, 4m, 64k, compiled, floor, ab)"; exit 2 ;;
  esac
done
