#!/usr/bin/env bash
# LRA ListOps and Pathfinder-32 on one GPU (an H200): six attentions side by side (and several seeds, if
# asked), the same budget (experiments/configs/<task>_h200.yaml). It works in the repository root; every call fits
# in one 10-minute command and is resumable: call the same phase again to continue unfinished cells.
#
#   experiments/lra_h200.sh data           # ListOps (LRA settings) + Pathfinder-32 into data/lra_release, skip what is there
#   experiments/lra_h200.sh listops        # ListOps data if missing (Pathfinder generated meanwhile, niced),
#                                      # the six ListOps runs in parallel until done or the call's budget, then collect
#   experiments/lra_h200.sh pathfinder32   # the same for Pathfinder-32
#   experiments/lra_h200.sh all            # listops; then, once every ListOps cell has finished and at least
#                                      # 3 minutes are left, pathfinder32 in the same call; then collect
#   experiments/lra_h200.sh collect        # hopformer lra --collect-only; results + metrics to $OUT
#   experiments/lra_h200.sh status         # per cell: step / steps, speed, time to finish
#
# Run folders are <RUNS_DIR>/<task>-<attention>-s<seed>, the naming of `hopformer lra`, so
# `hopformer lra --collect-only` finds them. Each run logs to <run folder>/stdout.log. A cell with
# results.json is done; one with a checkpoint (last/) is resumed with --resume; any other is started.
# The runs stop themselves before the call's budget (hopformer train --time-limit: checkpoint, exit 0).
#
# Environment (all optional):
#   BUDGET_MIN=9          minutes this call may take in all (the command limit is 10); the runs get what
#                         is left after data preparation, less 1 minute for collecting
#   SEEDS="0"             the seeds: every (attention, seed) cell runs side by side, e.g. SEEDS="0 1 2"
#                         (SEED=N is accepted for one seed)
#   ATTENTIONS="full bigbird hypercube diffuser routing combiner"
#   STEPS_listops=N, STEPS_pathfinder32=N   step budget for every cell of that task, new or resumed
#                         (the rsqrt schedule of the _h200 configs does not depend on it; never below
#                         the step a cell has reached: the trainer refuses)
#   EXTRA_SET="k=v ..."   extra --set settings for new cells (smoke tests: tiny model, few steps)
#   PRETRAIN_STEPS=N      self-pretrain each cell first: <cell>-pretrain trains N steps on the masked
#                         objective, then the cell's classifier starts from its encoder (train.init_from)
#   PRETRAIN_SET="k=v ..."  extra --set settings for the pretraining only, e.g. "optim.lr=3e-4"
#   OPTS_<attention>="k=v ..."  extra --attention-option settings for new cells of that attention
#   DATA_DIR=data/lra_release  RUNS_DIR=runs/lra  CONFIG_SUFFIX=_h200
#   CONFIG_DIR            where <task><CONFIG_SUFFIX>.yaml is read; unset: experiments/configs when the file is
#                         there (the device-only _h200 configs), else configs/lra (_pytorch, _pytorch_long, ...)
#   PF_N=200000           Pathfinder images (LRA: 200,000 per folder, split 80/10/10)
#   PF_DIFFICULTY=curv_contour_length_14   the folder generated and trained on (curv_baseline: easy)
#   PF_RENDER=coverage    `hopformer data pathfinder --render` (lanczos: snakes2's intensities)
#   PF_BG_WORKERS         processes for Pathfinder generated during the ListOps runs (default: CPUs - 8;
#                         0: none, e.g. when several seeds run the listops phase side by side)
#   LISTOPS_ARGS          extra arguments of `hopformer data listops` (smoke tests: --train 64 ...)
#   DEVICE                --device for the runs (default: the config's auto)
#   PYTHON=python         the interpreter; the CLI runs as "$PYTHON -m hopformer.cli" from the repository
#                         (no installation needed; torch, numpy, pyyaml, tqdm, safetensors, pillow are)
#   OUT                   where collect copies results.md/json and, per cell, metrics.jsonl, stdout.log,
#                         results.json, config.yaml and checkpoints under 8 MB (Pathfinder's), as
#                         OUT/lra/<cell>/: `hopformer lra --collect-only --runs-dir OUT/lra` rebuilds the table
set -uo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$SELF")/.." || exit 1

PHASE=${1:-}
START=$(date +%s)
BUDGET_MIN=${BUDGET_MIN:-9}
read -r -a SEED_LIST <<<"${SEEDS:-${SEED:-0}}"
ATTENTIONS=${ATTENTIONS:-"full bigbird hypercube diffuser routing combiner"}
DATA_DIR=${DATA_DIR:-data/lra_release}
RUNS_DIR=${RUNS_DIR:-runs/lra}
CONFIG_DIR=${CONFIG_DIR:-}
CONFIG_SUFFIX=${CONFIG_SUFFIX-_h200}
PF_N=${PF_N:-200000}
PF_DIFFICULTY=${PF_DIFFICULTY:-curv_contour_length_14}
PF_RENDER=${PF_RENDER:-coverage}
NCPU=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS: a caller's 2 would leave 2 workers
PF_BG_WORKERS=${PF_BG_WORKERS:-$((NCPU > 10 ? NCPU - 8 : 2))}
PY=${PYTHON:-python}
HOP=("$PY" -m hopformer.cli)
read -r -a ATTN <<<"$ATTENTIONS"
# the end of this call's budget, less one minute for collecting and copying (epoch seconds)
END=${END:-$("$PY" -c "print(int($START + 60 * ($BUDGET_MIN - 1)))")}

# Six processes share the machine: few CPU threads each, few kernel-compile workers each; compiled
# kernels are kept under RUNS_DIR so a resumed run does not compile them again; decoded Pathfinder
# pixels are cached beside the data.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-4}
absolute() { if [[ $1 == /* ]]; then echo "$1"; else echo "$PWD/$1"; fi; }
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$(absolute "$RUNS_DIR")/.inductor-cache}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export HOPFORMER_CACHE=${HOPFORMER_CACHE:-$(absolute "$DATA_DIR")/.cache}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
mkdir -p "$RUNS_DIR" "$DATA_DIR"

log() { echo "[lra_h200 $(date +%H:%M:%S) +$(($(date +%s) - START))s] $*"; }
until_end() { echo $((END - $(date +%s))); }  # seconds left before END

if ! "$PY" -c "import torch, numpy, yaml, tqdm, safetensors, PIL" 2>/dev/null; then
  "$PY" -c "import torch, numpy, yaml, tqdm, safetensors, PIL"
  echo "lra_h200: $PY lacks a package hopformer needs (above); install it first" >&2
  exit 1
fi

listops_ready() {
  local f
  for f in basic_train.tsv basic_val.tsv basic_test.tsv; do [[ -f $DATA_DIR/listops-1000/$f ]] || return 1; done
}

pathfinder_ready() {  # every metadata file of PF_N images written (the generator writes each last)
  local folder=$DATA_DIR/pathfinder32/$PF_DIFFICULTY/metadata
  local need=$(((PF_N + 999) / 1000)) have
  have=$(find "$folder" -maxdepth 1 -name '*.npy' 2>/dev/null | wc -l)
  [[ $have -ge $need ]]
}

make_listops() {
  if listops_ready; then log "ListOps: $DATA_DIR/listops-1000 is there"; return 0; fi
  log "ListOps: generating into $DATA_DIR/listops-1000"
  # shellcheck disable=SC2086  # LISTOPS_ARGS is a list of arguments
  "${HOP[@]}" data listops --out "$DATA_DIR/listops-1000" --no-progress ${LISTOPS_ARGS:-} || return 1
  log "ListOps: done"
}

# Pathfinder-32 images (resumable: images already there are kept), then the decoded-pixel cache that
# the runs read. $1: worker processes. Both stop at END (the next call goes on from there).
make_pathfinder() {
  local workers=$1
  if ! pathfinder_ready; then
    if (($(until_end) < 30)); then log "Pathfinder-32: no time left in this call"; return 1; fi
    log "Pathfinder-32: generating $PF_N images into $DATA_DIR ($workers processes, at most $(until_end) s)"
    timeout -k 10 "$(until_end)" "${HOP[@]}" data pathfinder --out "$DATA_DIR" --n "$PF_N" --workers "$workers" \
      --difficulty "$PF_DIFFICULTY" --render "$PF_RENDER" --no-progress || { log "Pathfinder-32: not complete yet (call again to continue)"; return 1; }
  fi
  if (($(until_end) < 30)); then log "Pathfinder-32: images ready; no time left for the pixel cache"; return 1; fi
  log "Pathfinder-32: $PF_N images there; the pixel cache (built once, about a minute)"
  timeout -k 10 "$(until_end)" "$PY" -c "
from hopformer.data import load_lra
load_lra('pathfinder32', '$DATA_DIR', 'val', difficulty='$PF_DIFFICULTY')
print('pixel cache ready')" || { log "Pathfinder-32: pixel cache not built yet (the runs build it)"; return 1; }
}

# The config of task $1: $CONFIG_DIR/<task><suffix>.yaml when CONFIG_DIR is set, else the device-only one in
# experiments/configs if there is one, else the shipped one in configs/lra.
config_path() {
  local name=$1${CONFIG_SUFFIX}.yaml
  if [[ -n $CONFIG_DIR ]]; then echo "$CONFIG_DIR/$name"
  elif [[ -f experiments/configs/$name ]]; then echo "experiments/configs/$name"
  else echo "configs/lra/$name"; fi
}

has_checkpoint() { [[ -f $1/last/state.pt || -f $1/.last.old/state.pt ]]; }

# ARGS: the `hopformer` arguments of one stage of a cell, resuming its folder or starting it.
# $1 task, $2 attention, $3 seed, $4 time limit (minutes), $5 stage: `pretrain` (the masked objective,
# in <cell>-pretrain) or `classify` (the cell itself; it starts from the pretrained encoder when there
# is one), $6 the stage's folder.
stage_args() {
  local task=$1 attention=$2 seed=$3 limit=$4 stage=$5 dir=$6 kv
  if has_checkpoint "$dir"; then
    ARGS=(train --resume "$dir" --time-limit "$limit" --no-progress)
  else
    ARGS=(train --config "$(config_path "$task")" --task "$task" --attention "$attention" --seed "$seed"
      --data-dir "$DATA_DIR" --run-dir "$dir" --time-limit "$limit" --no-progress)
    local name=OPTS_$attention
    for kv in ${EXTRA_SET:-}; do ARGS+=(--set "$kv"); done
    if [[ $task == pathfinder32 && $PF_DIFFICULTY != curv_contour_length_14 ]]; then
      ARGS+=(--set "data.pathfinder_difficulty=$PF_DIFFICULTY")
    fi
    for kv in ${!name:-}; do ARGS+=(--attention-option "$kv"); done
    if [[ -n ${DEVICE:-} ]]; then ARGS+=(--device "$DEVICE"); fi
    if [[ $stage == pretrain ]]; then
      ARGS+=(--set train.objective=masked)
      for kv in ${PRETRAIN_SET:-}; do ARGS+=(--set "$kv"); done
    elif [[ -n ${PRETRAIN_STEPS:-} ]]; then
      ARGS+=(--set "train.init_from=$dir-pretrain")
    fi
  fi
  local steps=STEPS_$task
  if [[ $stage == pretrain ]]; then
    ARGS+=(--steps "$PRETRAIN_STEPS")
  elif [[ -n ${!steps:-} ]]; then
    ARGS+=(--steps "${!steps}")
  fi
}

# A run's own time limit: the minutes left before END, less a little for starting Python.
minutes_left() { "$PY" -c "print(round(($END - $(date +%s)) / 60 - 0.2, 2))"; }
at_least() { "$PY" -c "import sys; sys.exit(0 if $1 >= $2 else 1)"; }  # $1 >= $2, as numbers

# The folder of cell $1's current stage: its pretraining until that has finished, else the cell.
current_stage_dir() {
  if [[ -n ${PRETRAIN_STEPS:-} && ! -f $1-pretrain/results.json ]]; then echo "$1-pretrain"; else echo "$1"; fi
}

NO_TIME=75  # run_cell's exit status when too little time was left to start the cell's next stage

# One cell, run in the background by launch: its pretraining first when PRETRAIN_STEPS is set, then
# the classifier, each with what is left before END as its time limit. A TERM is passed on to the
# stage running. The exit status is that of the last stage run.
run_cell() {
  local task=$1 attention=$2 seed=$3 least=$4 stage dir limit child code=0
  local cell=$RUNS_DIR/$task-$attention-s$seed
  local -a stages=(classify)
  if [[ -n ${PRETRAIN_STEPS:-} ]]; then stages=(pretrain classify); fi
  for stage in "${stages[@]}"; do
    dir=$cell
    if [[ $stage == pretrain ]]; then dir=$cell-pretrain; fi
    if [[ -f $dir/results.json ]]; then continue; fi
    limit=$(minutes_left)
    if ! at_least "$limit" "$least"; then return "$NO_TIME"; fi
    stage_args "$task" "$attention" "$seed" "$limit" "$stage" "$dir"
    mkdir -p "$dir"
    echo "=== $(date '+%F %T') ${HOP[*]} ${ARGS[*]}" >>"$dir/stdout.log"
    "${HOP[@]}" "${ARGS[@]}" >>"$dir/stdout.log" 2>&1 &
    child=$!
    trap 'kill -TERM "$child" 2>/dev/null' TERM
    while kill -0 "$child" 2>/dev/null; do  # a trapped signal interrupts `wait`: wait again
      wait "$child"
    done
    wait "$child"  # the run's own exit status (bash keeps it), not that of an interrupted wait
    code=$?
    trap - TERM
    if [[ ! -f $dir/results.json ]]; then return "$code"; fi
  done
  return "$code"
}

# Start (or resume) one cell ($1 task, $2 attention, $3 seed) in the background; its pid is appended to PIDS.
launch() {
  local task=$1 attention=$2 seed=$3 least=$4
  run_cell "$task" "$attention" "$seed" "$least" &
  PIDS+=($!)
}

PIDS=()
forward() { log "signal: asking the runs to checkpoint and stop"; kill -TERM "${PIDS[@]}" 2>/dev/null; }

# The cells of one task in parallel; wait for all; report how each ended. $2: the fewest minutes
# worth starting a run for (default 1.5).
train_task() {
  local task=$1 least=${2:-1.5} limit attention seed dir log_of
  local -a cells=()
  limit=$(minutes_left)
  if ! at_least "$limit" "$least"; then
    log "$task: only $limit min left in this call; no runs started"
    return 0
  fi
  for attention in "${ATTN[@]}"; do
    for seed in "${SEED_LIST[@]}"; do
      dir=$RUNS_DIR/$task-$attention-s$seed
      if [[ -f $dir/results.json ]]; then log "$(basename "$dir"): finished earlier"; continue; fi
      launch "$task" "$attention" "$seed" "$least"
      cells+=("$dir")
      log_of=$(current_stage_dir "$dir")
      log "$(basename "$dir"): running (pid ${PIDS[-1]}, $limit min left), log $log_of/stdout.log"
    done
  done
  trap forward TERM INT
  local i code
  for i in "${!cells[@]}"; do
    while kill -0 "${PIDS[$i]}" 2>/dev/null; do wait "${PIDS[$i]}"; done
    wait "${PIDS[$i]}"
    code=$?
    dir=${cells[$i]}
    log_of=$(current_stage_dir "$dir")
    if [[ $code == 0 && -f $dir/results.json ]]; then
      log "$dir: finished"
    elif [[ $code == 0 ]]; then
      log "$log_of: stopped at its time limit (call again to continue)"
    elif [[ $code == "$NO_TIME" ]]; then
      log "$dir: its next stage waits for the next call (less than $least min left)"
    elif [[ $code == 130 || $code == 143 ]]; then
      log "$log_of: stopped by a signal, checkpoint saved (call again to continue)"
    else
      log "$log_of: exit status $code; the end of its log:"
      tail -n 5 "$log_of/stdout.log"
    fi
  done
  trap - TERM INT
  PIDS=()
}

collect() {
  local tasks=listops,pathfinder32 attentions seeds seed
  attentions=$(IFS=,; echo "${ATTN[*]}")
  seeds=$(IFS=,; echo "${SEED_LIST[*]}")
  local -a scale=()
  if [[ $CONFIG_SUFFIX == _pytorch* ]]; then scale=(--scale pytorch); fi  # the published row of that setting
  "${HOP[@]}" lra --tasks "$tasks" --attentions "$attentions" --seeds "$seeds" --runs-dir "$RUNS_DIR" \
    "${scale[@]}" --collect-only
  status
  if [[ -n ${OUT:-} ]]; then
    local dir dest
    mkdir -p "$OUT/lra"
    cp "$RUNS_DIR/results.md" "$RUNS_DIR/results.json" "$OUT/lra/" 2>/dev/null
    for dir in "$RUNS_DIR"/*; do
      [[ -d $dir ]] || continue
      seed=${dir##*-s}; seed=${seed%-pretrain}
      [[ " ${SEED_LIST[*]} " == *" $seed "* ]] || continue
      dest=$OUT/lra/$(basename "$dir")
      mkdir -p "$dest"
      for f in metrics.jsonl stdout.log results.json config.yaml error.txt; do
        if [[ -f $dir/$f ]]; then cp "$dir/$f" "$dest/"; fi
      done
      # small checkpoints (Pathfinder: ~0.5 MB) too: an unfinished cell can then be carried to a fresh
      # machine and resumed there (the data is regenerated identically from its seed)
      for f in last best; do
        if [[ -d $dir/$f ]] && (($(du -sk "$dir/$f" | cut -f1) < 8192)); then cp -r "$dir/$f" "$dest/"; fi
      done
    done
    log "copied the table, metrics, logs and small checkpoints to $OUT/lra"
  fi
}

# Per cell: step reached, speed of the last log window (while sharing the GPU), finish estimate.
status() {
  "$PY" - "$RUNS_DIR" "${SEED_LIST[*]}" "${ATTN[@]}" <<'EOF'
import json, sys
from pathlib import Path
runs, seeds, attentions = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3:]
for task in ("listops", "pathfinder32"):
    rows, gpu_min = [], 0.0
    for attention, seed, suffix in ((a, s, x) for a in attentions for s in seeds for x in ("-pretrain", "")):
        run = runs / f"{task}-{attention}-s{seed}{suffix}"
        if not run.is_dir() or not any(run.iterdir()):
            continue
        attention = f"{attention}-s{seed}{suffix}"
        steps = None
        if (run / "config.yaml").is_file():
            import yaml
            steps = yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"]
        records = []
        if (run / "metrics.jsonl").is_file():
            records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
        train = [r for r in records if r["split"] == "train"]
        val = [r for r in records if r["split"] == "val"]
        step = train[-1]["step"] if train else 0
        rate = train[-1].get("steps_per_s") if train else None
        if (run / "results.json").is_file():
            result = json.loads((run / "results.json").read_text())
            rows.append(f"  {attention:24s} done: {step}/{steps} steps, test {100 * result['test_accuracy']:.2f}%")
            continue
        text = f"  {attention:24s} step {step}/{steps}"
        if val:
            text += f", val {100 * max(r['accuracy'] for r in val):.2f}% (best)"
        if rate and steps:
            left = (steps - step) / rate / 60
            gpu_min += left
            text += f", {rate:.2f} steps/s when last logged: {left:.1f} min to go at that speed"
        if (run / "error.txt").is_file() or not train:
            text += "  [see stdout.log]"
        rows.append(text)
    if rows:
        active = sum("done" not in r for r in rows)
        print(f"{task}:")
        print("\n".join(rows))
        if active:
            # each unfinished run had ~1/active of the GPU: alone it would go `active` times faster
            print(f"  => all unfinished runs: about {gpu_min / max(active, 1):.1f} min of GPU time left "
                  f"(if the GPU was shared by {active} runs when they logged)")
EOF
}

finished() {  # every cell of task $1 has results.json
  local attention seed
  for attention in "${ATTN[@]}"; do
    for seed in "${SEED_LIST[@]}"; do [[ -f $RUNS_DIR/$1-$attention-s$seed/results.json ]] || return 1; done
  done
}

# ListOps data, Pathfinder generated meanwhile on the idle CPUs (niced), the ListOps cells.
listops_phase() {
  make_listops || exit 1
  local bg=
  if ! pathfinder_ready && ((PF_BG_WORKERS > 0)); then
    END=$END nice -n 19 "$SELF" _pathfinder "$PF_BG_WORKERS" >>"$RUNS_DIR/pathfinder-data.log" 2>&1 &
    bg=$!
    log "Pathfinder-32 generation in the background ($PF_BG_WORKERS processes), log $RUNS_DIR/pathfinder-data.log"
  fi
  train_task listops
  if [[ -n $bg ]]; then wait "$bg"; tail -n 1 "$RUNS_DIR/pathfinder-data.log"; fi
}

case $PHASE in
  data)
    make_listops || exit 1
    make_pathfinder "$NCPU" || exit 0
    ;;
  listops)
    listops_phase
    collect
    ;;
  all)
    if ! finished listops; then listops_phase; fi
    if ! finished listops; then
      log "ListOps not finished (or a cell failed: see status); Pathfinder-32 waits for the next call"
    elif finished pathfinder32; then
      log "Pathfinder-32: every cell finished earlier"
    elif (($(until_end) < 180)); then
      log "less than 3 minutes left: Pathfinder-32 in the next call"
    elif make_pathfinder "$NCPU"; then
      train_task pathfinder32 3
    fi
    collect
    ;;
  pathfinder32)
    if ! finished pathfinder32 && ! make_pathfinder "$NCPU"; then
      log "Pathfinder-32 data not ready: call again"
      collect
      exit 0
    fi
    train_task pathfinder32
    collect
    ;;
  _pathfinder) make_pathfinder "$2" ;;  # (internal: the background job of the listops phase)
  collect) collect ;;
  status) status ;;
  *)
    sed -n '2,15p' "$SELF"
    exit 2
    ;;
esac
