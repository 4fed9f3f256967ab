#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job on its small built-in default: the benchmark suite in
# quick mode (every op against eager PyTorch and torch.compile), printing a table and writing a plot.
# Extra arguments go to bench/run.py (e.g. drop --quick by running bench/run.py yourself for the full sweep).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python bench/run.py --quick "$@"
