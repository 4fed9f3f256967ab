#!/usr/bin/env bash
# Sets up everything umm_ops needs on a fresh machine, idempotently:
#   .venv (Python venv) with pinned torch / triton, the build tools and the CUTLASS headers, then umm_ops itself built
#   from this checkout (C++ CPU kernels always; CUDA kernels when nvcc is found) and installed editable with the
#   extras of pyproject.toml that the demo, the tests and the benchmarks use: umm_ops[all,test,bench].
# Environment knobs:
#   UMM_TORCH_SPEC   torch requirement (default torch==2.13.0; a CUDA user sets e.g. "torch==2.11.0")
#   UMM_CUDA         AUTO (default) / ON / OFF      UMM_CUDA_ARCHS  default "80;90a"
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# the pins; every other dependency comes from pyproject.toml's extras
pins=("${UMM_TORCH_SPEC:-torch==2.13.0}" "triton==3.8.0")
extras="all,test,bench"
# the dependencies are (re)installed when the pins, the extras or pyproject.toml change
stamp=.venv/.umm_deps_$( { printf '%s\n' "${pins[@]}" "$extras"; cat pyproject.toml; } | sha1sum | cut -c1-12)
start=$(date +%s)
if [ ! -f "$stamp" ]; then
  echo "[setup] installing dependencies"
  python -m pip install -q --upgrade pip
  # what the build itself needs first (it compiles against this torch, and pins its release in the metadata)
  python -m pip install -q "${pins[@]}" "numpy" "scikit-build-core>=0.10" "ninja" "cmake>=3.25"
  python -m pip install -q --no-deps "nvidia-cutlass==4.2.0.0"
  echo "[setup] building umm_ops (this compiles the C++ and, when nvcc is present, the CUDA kernels)" \
       "and installing its extras [$extras]"
  python -m pip install -q --no-build-isolation -e ".[$extras]" "${pins[@]}"
  rm -f .venv/.umm_deps_*
  touch "$stamp"
else
  echo "[setup] building umm_ops (this compiles the C++ and, when nvcc is present, the CUDA kernels)"
  python -m pip install -q --no-build-isolation --no-deps -e .
fi
echo "[setup] build done in $(( $(date +%s) - start )) s"
python -m umm_ops info
