#!/usr/bin/env bash
set -euo pipefail
export OMP_NUM_THREADS=1
for a in "$@"; do r=${a%:*}; s=${a#*:}
  /work/main/.venv/bin/umm eval $r/checkpoint-$s --tasks geneval --n 128 --steps 12 --brief --json ev128-$r-$s.json --out evdir-$r-$s > evlog-$r-$s.txt 2>&1
done
