#!/usr/bin/env bash
# The byte-level LM study at 4K context on one GPU: each attention's training step alone (benchmarks/lm_step.py),
# then six runs of configs/bytes_4k.yaml side by side (same steps, seed and data), each stopping cleanly by
# LIMIT minutes and resumable by running this again. Writes under $OUT: the step benchmark, the runs' logs
# and results (no checkpoints), and the best/ weights of the runs named in KEEP (for sampling).
set -uo pipefail
export PYTHONUNBUFFERED=1
RUNS=${RUNS:-runs/lm4k}; LIMIT=${LIMIT:-7}; KEEP=${KEEP:-diffuser}
ATTENTIONS=${ATTENTIONS:-"full bigbird diffuser routing combiner hypercube"}
mkdir -p "$RUNS"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "from hopformer.data.corpus import stdlib_corpus; print(stdlib_corpus().describe())"
if [ "${STEP_BENCH:-1}" = 1 ]; then
  python3 benchmarks/lm_step.py --config configs/bytes_4k.yaml --attentions "$(echo ${ATTENTIONS//@*/} | tr ' ' ,)" \
    --out "$OUT/lm_step.json"
fi
# an entry is an attention, or attention@key=value,key=value for its options (run folder attention_key=value...)
for entry in $ATTENTIONS; do
  a=${entry%%@*}; options=(); run=$a
  if [[ $entry == *@* ]]; then
    IFS=, read -ra pairs <<< "${entry#*@}"
    for kv in "${pairs[@]}"; do options+=(--attention-option "$kv"); run="${run}_${kv}"; done
  fi
  [ -f "$RUNS/$run/results.json" ] && continue
  if [ -d "$RUNS/$run/last" ]; then
    python3 -m hopformer train --resume "$RUNS/$run" --time-limit "$LIMIT" --no-progress >> "$RUNS/$run.log" 2>&1 &
  else
    python3 -m hopformer train --config configs/bytes_4k.yaml --attention "$a" "${options[@]}" --run-dir "$RUNS/$run" \
      --time-limit "$LIMIT" --no-progress > "$RUNS/$run.log" 2>&1 &
  fi
done
wait
for log in "$RUNS"/*.log; do echo "== $log"; tail -2 "$log"; done
tar -czf "$OUT/lm4k_runs.tar.gz" --exclude='*/last' --exclude='*/best' --exclude='*/.last*' --exclude='*/.best*' "$RUNS"
for a in $KEEP; do
  mkdir -p "$OUT/best_$a" && cp "$RUNS/$a/best/config.json" "$RUNS/$a/best/model.safetensors" "$OUT/best_$a/" 2>/dev/null
done
