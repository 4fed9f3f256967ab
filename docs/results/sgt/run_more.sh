#!/usr/bin/env bash
# More arms / seeds of the smoke-scale comparison (docs/results/sgt/README.md): for each ARM:SEED the base run
# continued STEPS steps with that proxy (none = understanding only) and run seed, then the same held-out evaluation.
#   bash docs/results/sgt/run_more.sh "none:1 instance_seg:1 edge:0" [BASE_CHECKPOINT] [STEPS] [N_EVAL]
set -euo pipefail
RUNS=$1
BASE=${2:-/work/main/runs/base5/checkpoint-1800}
STEPS=${3:-100}
N=${4:-128}
OUT=docs/results/sgt
export OMP_NUM_THREADS=1
TASKS=vqa,vqa-short,probe,attention,geneval,seg-miou
for rs in $RUNS; do
  arm=${rs%%:*}; seed=${rs##*:}
  nice -n 19 .venv/bin/umm train --recipe sgt --init "$BASE" --proxy "$arm" --seed "$seed" --steps "$STEPS" \
    --out "runs/sgt-$arm-s$seed" --no-resume --no-eval --device cpu --set checkpoint.every="$STEPS" \
    --set metrics.plot=false 2>&1 | tail -1
  cp "runs/sgt-$arm-s$seed/summary.json" "$OUT/train-$arm-s$seed.json"
  nice -n 19 .venv/bin/umm eval "runs/sgt-$arm-s$seed" --tasks "$TASKS" --n "$N" --steps 12 --brief \
    --json "$OUT/eval-$arm-s$seed.json" | tail -10
done
