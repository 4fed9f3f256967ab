#!/bin/bash
# usage: cg_run.sh NAME SEED STEPS [extra --set args...]
cd /work/main
name=$1; seed=$2; steps=$3; shift 3
export OMP_NUM_THREADS=1
start=$(date +%s)
.venv/bin/umm train --recipe clear-grpo --set recipe.init=runs/clear4 --steps $steps --set checkpoint.every=8 --lr 1e-5 \
  --set recipe.prompts_per_micro=1 --set recipe.decision_weight=1.0 --set recipe.eval_items=0 --seed $seed \
  --device cpu --out runs/$name "$@" > runs/$name.log 2>&1
mid=$(date +%s)
.venv/bin/umm eval runs/$name --tasks clear-short --n 64 --steps 10 --device cpu --json runs/$name-eval-cs64.json > runs/$name-eval.log 2>&1
echo "$name train $((mid-start)) s eval $(( $(date +%s)-mid )) s rc $?" >> runs/cg_queue.log
