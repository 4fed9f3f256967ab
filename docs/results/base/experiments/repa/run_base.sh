#!/usr/bin/env bash
# the base schedule (defaults) + options, 2 threads unless OMP_NUM_THREADS is set
set -euo pipefail
UMM=/work/main/.venv/bin/umm
name=$1; shift
/usr/bin/time -v $UMM train --out $name --no-resume --device cpu --keep-last 2 --no-progress "$@" > log-$name.txt 2> time-v-$name.txt
