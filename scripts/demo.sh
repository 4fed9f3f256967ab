#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job on its small built-in default:
#   1. `umm train --steps 600`: the tiny Cheers-style model on the synthetic world (a short base schedule, ~5 min of training),
#      then evaluated on held-out scenes -> runs/demo/ (checkpoints, metrics.jsonl, loss_curve.png,
#      eval/grid.png, summary.json); running the demo again resumes from the last checkpoint;
#   2. the kernel benchmarks in quick mode (every op against eager PyTorch, torch.compile and the attention peers),
#      printing tables and writing bench/results/quick/<device>.json and .png.
# Extra arguments go to `umm train` (e.g. --steps 300 --image-size 128, or --no-resume).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
umm train --out runs/demo --steps 600 "$@"
python bench/run.py --quick
