#!/bin/bash
# usage: sft_seed.sh NAME SEED RECIPE [extra args]
cd /work/main
name=$1; seed=$2; recipe=$3; shift 3
export OMP_NUM_THREADS=1
start=$(date +%s)
.venv/bin/umm train --recipe $recipe --set recipe.init=runs/base5/checkpoint-1800 --seed $seed --no-eval --device cpu --out runs/$name "$@" > runs/$name.log 2>&1
mid=$(date +%s)
tasks=clear-short; [ $recipe = clear-bridge ] && tasks=clear-short,clear-short-bridge
.venv/bin/umm eval runs/$name --tasks $tasks --n 128 --device cpu --json runs/$name-eval-cs128.json > runs/$name-eval.log 2>&1
echo "$name train $((mid-start)) s eval $(( $(date +%s)-mid )) s" >> runs/cg_queue.log
