#!/usr/bin/env bash
# ListOps (LRA size, generated), the long small-model recipe (configs/lra/listops_pytorch_long.yaml), 12 runs
# sharing one H200: bigbird seeds 5-8, diffuser with the root global (global_blocks=[0,5]) seeds 5-8, and
# diffuser on bigbird's global layout (global_blocks=[0,1]) seeds 0-3. Every cell resumes from runs/lo17/<cell>/last.
# env: TOTAL_S (wall budget of this call), CELLS (which cells, default all).
set -u
START=$(date +%s)
TOTAL_S=${TOTAL_S:-560}
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
mkdir -p runs/lo17
D=data/lra_release/listops-1000
if [ ! -f $D/basic_test.tsv ]; then
  python -m hopformer.cli data listops --out $D --no-progress || exit 1
fi
md5sum $D/basic_val.tsv $D/basic_test.tsv
echo "data ready at +$(( $(date +%s) - START ))s"
LEFT=$(( TOTAL_S - ($(date +%s) - START) - 45 ))
LIMIT=$(python -c "print(round($LEFT/60, 2))")
echo "runs get $LIMIT min"
BASE=(--config configs/lra/listops_pytorch_long.yaml --data-dir data/lra_release)
cell() {  # cell NAME ARGS...: resume or start runs/lo17/NAME in the background
  local name=$1 d=runs/lo17/$1
  shift
  case " ${CELLS:-$name} " in *" $name "*) ;; *) return ;; esac
  if [ -f $d/results.json ]; then return; fi
  mkdir -p $d
  if [ -f $d/last/state.pt ] || [ -f $d/.last.old/state.pt ]; then
    python -m hopformer.cli train --resume $d --time-limit $LIMIT --no-progress >> $d/stdout.log 2>&1 &
  else
    python -m hopformer.cli train "${BASE[@]}" "$@" --run-dir $d --time-limit $LIMIT --no-progress >> $d/stdout.log 2>&1 &
  fi
}
for s in 5 6 7 8; do
  cell bigbird-s$s --attention bigbird --seed $s
  cell diffuser-g05-s$s --attention diffuser --attention-option "global_blocks=[0,5]" --seed $s
done
for s in 0 1 2 3; do
  cell diffuser-g01-s$s --attention diffuser --attention-option "global_blocks=[0,1]" --seed $s
done
sleep 120; nvidia-smi > $OUT/smi.txt; uptime >> $OUT/smi.txt
wait
for f in runs/lo17/*/stdout.log; do echo "== $f"; grep "val acc" $f | tail -1; tail -1 $f; done
python - <<'PY'
import json, glob
for f in sorted(glob.glob("runs/lo17/*/metrics.jsonl")):
    rows = [json.loads(l) for l in open(f)]
    tr = [r for r in rows if r["split"] == "train"]; va = [r for r in rows if r["split"] == "val"]
    best = max(va, key=lambda r: r["accuracy"]) if va else None
    print(f.split("/")[2], "step", tr[-1]["step"] if tr else 0, "steps/s %.1f" % (tr[-1].get("steps_per_s") or 0) if tr else "",
          "best val %.2f @%d" % (100 * best["accuracy"], best["step"]) if best else "")
PY
tar czf - runs/lo17 | split -b 15M -d - $OUT/lo17.tgz.part
ls -la $OUT
