#!/usr/bin/env bash
# probe and attention on more held-out records (n = 512: ~130 one-object scenes for the colour / shape / position
# probes instead of ~64) for the base and every run of the comparison: probe-<name>.json
#   bash docs/results/sgt/run_probe.sh [BASE_CHECKPOINT] [N]
set -euo pipefail
BASE=${1:-/work/main/runs/base5/checkpoint-1800}
N=${2:-512}
OUT=docs/results/sgt
export OMP_NUM_THREADS=1
nice -n 19 .venv/bin/umm eval "$BASE" --tasks probe,attention --n "$N" --brief --json "$OUT/probe-base.json" | tail -4
for run in runs/sgt-*; do
  name=${run#runs/sgt-}
  nice -n 19 .venv/bin/umm eval "$run" --tasks probe,attention --n "$N" --brief --json "$OUT/probe-$name.json" | tail -4
done
