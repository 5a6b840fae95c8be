#!/usr/bin/env bash
# Many ListOps runs (LRA size, generated) sharing one GPU, each its own settings, resumable across calls.
# experiments/lra_h200.sh runs a grid of attentions x seeds; this runs any list of cells, e.g. option variants
# side by side. Run from the repository root; call it again to continue unfinished cells.
#
#   TOTAL_S=570 experiments/listops_cells_h200.sh RUNS_DIR CELLS_FILE
#
# CELLS_FILE: one cell per line, "NAME hopformer-train-arguments" (shell quoting; '#' comments), e.g.
#   diffuser-g01-s0  --attention diffuser --attention-option "global_blocks=[0,1]" --seed 0
# Every cell trains --config $CONFIG --data-dir $DATA_DIR into RUNS_DIR/NAME: a cell with results.json
# is done, one with a last/ checkpoint is resumed (--resume), any other is started. The runs stop themselves
# (--time-limit) before TOTAL_S seconds from the start of the call; then `hopformer report` shows where
# every cell stands, and with OUT set, RUNS_DIR is packed into OUT as 15 MB parts (the device's file limit).
# Env: TOTAL_S (default 560), CELLS="NAME ..." (only these), CONFIG (default configs/lra/listops_pytorch_long.yaml),
# DATA_DIR (default data/lra_release; ListOps is generated into DATA_DIR/listops-1000 when absent, with
# LISTOPS_ARGS as extra arguments of `hopformer data listops`), PYTHON (default python).
# Used for benchmarks/results/lra_listops_seeds2_h200, lra_listops_hop_dropout_h200 and lra_listops_hops_h200
# (their cells files are in experiments/cells/).
set -u
START=$(date +%s)
RUNS=${1:?usage: TOTAL_S=570 $0 RUNS_DIR CELLS_FILE}
CELLS_FILE=${2:?usage: TOTAL_S=570 $0 RUNS_DIR CELLS_FILE}
TOTAL_S=${TOTAL_S:-560}
CONFIG=${CONFIG:-configs/lra/listops_pytorch_long.yaml}
DATA_DIR=${DATA_DIR:-data/lra_release}
PY=${PYTHON:-python}
[ -f "$CELLS_FILE" ] || { echo "listops_cells_h200: CELLS_FILE $CELLS_FILE does not exist" >&2; exit 1; }
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
mkdir -p "$RUNS"
D=$DATA_DIR/listops-1000
if [ ! -f "$D/basic_test.tsv" ]; then
  # shellcheck disable=SC2086  # LISTOPS_ARGS is a list of arguments
  "$PY" -m hopformer.cli data listops --out "$D" --no-progress ${LISTOPS_ARGS:-} || exit 1
fi
md5sum "$D/basic_val.tsv" "$D/basic_test.tsv"  # val bcbf7544..., test bb74cdad... for the default generator
LEFT=$((TOTAL_S - ($(date +%s) - START) - 45))  # 45 s for the last checkpoint, the report and the packing
LIMIT=$("$PY" -c "print(round($LEFT / 60, 2))")
echo "data ready at +$(($(date +%s) - START))s; runs get $LIMIT min"

cell() {  # cell NAME ARGS...: resume or start RUNS/NAME in the background
  local name=$1 d=$RUNS/$1
  shift
  case " ${CELLS:-$name} " in *" $name "*) ;; *) return ;; esac
  if [ -f "$d/results.json" ]; then return; fi
  mkdir -p "$d"
  if [ -f "$d/last/state.pt" ] || [ -f "$d/.last.old/state.pt" ]; then
    "$PY" -m hopformer.cli train --resume "$d" --time-limit "$LIMIT" --no-progress >>"$d/stdout.log" 2>&1 &
  else
    "$PY" -m hopformer.cli train --config "$CONFIG" --data-dir "$DATA_DIR" "$@" --run-dir "$d" \
      --time-limit "$LIMIT" --no-progress >>"$d/stdout.log" 2>&1 &
  fi
}
while read -r line; do
  line=${line%%#*}
  [ -n "${line// /}" ] || continue
  eval "cell $line"  # the file's own quoting, e.g. "global_blocks=[0,1]"
done <"$CELLS_FILE"
if [ -n "${OUT:-}" ] && [ -n "$(jobs -r)" ]; then sleep 120 && nvidia-smi >"$OUT/smi.txt"; fi  # while they run
wait
"$PY" -m hopformer.cli report "$RUNS"/*/ | head -n 40 || true
if [ -n "${OUT:-}" ]; then tar czf - "$RUNS" | split -b 15M -d - "$OUT/$(basename "$RUNS").tgz.part"; fi
