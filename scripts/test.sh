#!/usr/bin/env bash
# Sets up (scripts/setup.sh: venv, dependencies, build incl. every CUDA kernel when nvcc exists) and runs the
# whole test suite.  Without a GPU the Triton kernels run through the Triton interpreter and the CUDA-marked
# tests are skipped; on a GPU machine the same files test the CUDA and Triton kernels on the device.
# Extra arguments go to pytest (e.g. -m "not slow", -k flow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pytest tests "$@"
