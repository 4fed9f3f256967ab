#!/usr/bin/env bash
# The smoke-scale SGT comparison of docs/results/sgt/README.md: the base run (base5, 1800 steps of SFT) continued
# 100 steps on understanding data only (recipe.proxy=none) and on understanding + instance segmentation maps
# (recipe.proxy=instance_seg, 2 proxy : 1 understanding), one seed each, then the same held-out evaluation of the
# base and of both arms.  2 CPU cores, OMP_NUM_THREADS=1.
#   bash docs/results/sgt/run.sh [BASE_CHECKPOINT] [STEPS] [N_EVAL]
set -euo pipefail
BASE=${1:-/work/main/runs/base5/checkpoint-1800}
STEPS=${2:-100}
N=${3:-128}
OUT=docs/results/sgt
export OMP_NUM_THREADS=1
TASKS=vqa,vqa-short,probe,attention,geneval,seg-miou
for arm in none instance_seg; do
  nice -n 19 .venv/bin/umm train --recipe sgt --init "$BASE" --proxy "$arm" --steps "$STEPS" --out "runs/sgt-$arm" \
    --no-resume --no-eval --device cpu --set checkpoint.every="$STEPS" --set metrics.plot=false 2>&1 | tail -3
  cp "runs/sgt-$arm/summary.json" "$OUT/train-$arm.json"
done
nice -n 19 .venv/bin/umm eval "$BASE" --tasks "$TASKS" --n "$N" --steps 12 --brief --json "$OUT/eval-base.json" | tail -12
for arm in none instance_seg; do
  nice -n 19 .venv/bin/umm eval "runs/sgt-$arm" --tasks "$TASKS" --n "$N" --steps 12 --brief --json "$OUT/eval-$arm.json" | tail -12
done
