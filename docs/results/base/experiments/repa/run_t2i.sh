#!/usr/bin/env bash
# text-to-image only (stop 36-38's GEN schedule) with the current defaults, seed 0, one thread each
set -euo pipefail
export OMP_NUM_THREADS=1
UMM=/work/main/.venv/bin/umm
GEN="--no-resume --device cpu --steps 1800 --warmup 30 --set data.budget=256 --set recipe.caption_first=0 \
     --set recipe.tasks=generate --set checkpoint.every=600 --set checkpoint.keep_last=5 --no-progress \
     --set recipe.evaluate=false"
name=$1; shift
/usr/bin/time -v $UMM train --out $name $GEN "$@" > log-$name.txt 2> time-v-$name.txt
