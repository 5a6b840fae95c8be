#!/usr/bin/env bash
# The generative-task study on one GPU: masked-LM pretraining at 4K bytes (bits per hidden byte) and pixel modeling
# on generated 32 x 32 Pathfinder images (bits per dimension), full, bigbird, diffuser, routing and combiner at the
# same budget (STEPS steps each, seed 0), all ten runs side by side. Writes under $OUT the runs' logs, metrics and
# results (no checkpoints); `hopformer report` makes the tables and curves from them.
set -uo pipefail
export PYTHONUNBUFFERED=1
RUNS=${RUNS:-runs/generative}; STEPS=${STEPS:-300}; LIMIT=${LIMIT:-4}
ATTENTIONS=${ATTENTIONS:-"full bigbird diffuser routing combiner"}
mkdir -p "$RUNS"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# build the data once, before the runs share it
python3 -c "from hopformer.data.corpus import stdlib_corpus; print(stdlib_corpus().describe())"
python3 -c "from hopformer.data.images import pathfinder_images; print(pathfinder_images().describe())"
common=(--steps "$STEPS" --set train.eval_every=100 --time-limit "$LIMIT" --no-progress)
for a in $ATTENTIONS; do
  python3 -m hopformer train --config configs/generative/masked_bytes_4k.yaml --attention "$a" \
    --run-dir "$RUNS/masked_$a" "${common[@]}" > "$RUNS/masked_$a.log" 2>&1 &
  python3 -m hopformer train --config configs/generative/pixels_pathfinder32.yaml --attention "$a" \
    --run-dir "$RUNS/pixels_$a" "${common[@]}" > "$RUNS/pixels_$a.log" 2>&1 &
done
wait
for log in "$RUNS"/*.log; do echo "== $log"; tail -2 "$log"; done
tar -czf "$OUT/generative_runs.tar.gz" --exclude='*/last' --exclude='*/best' --exclude='*/.last*' --exclude='*/.best*' "$RUNS"
