#!/usr/bin/env bash
# Sets up everything umm_ops needs on a fresh machine, idempotently:
#   .venv (Python venv) with pinned torch / triton / build and test tools, the CUTLASS headers, and
#   umm_ops itself built from this checkout (C++ CPU kernels always; CUDA kernels when nvcc is found).
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
stamp=.venv/.umm_deps_v4  # bump when the dependency list changes
if [ ! -f "$stamp" ]; then
  echo "[setup] installing dependencies"
  python -m pip install -q --upgrade pip
  python -m pip install -q "${UMM_TORCH_SPEC:-torch==2.13.0}" "triton==3.8.0" "numpy" \
    "scikit-build-core>=0.10" "ninja" "cmake>=3.25" \
    "pytest>=8" "hypothesis>=6" "pytest-benchmark>=4" "matplotlib>=3.7" "rich>=13" "pillow>=10" \
    "safetensors>=0.4" "transformers>=4.45" "diffusers>=0.42" "tensorboard>=2.15"
  python -m pip install -q --no-deps "nvidia-cutlass==4.2.0.0"
  touch "$stamp"
fi
echo "[setup] building umm_ops (this compiles the C++ and, when nvcc is present, the CUDA kernels)"
start=$(date +%s)
python -m pip install -q --no-build-isolation --no-deps -e . 
echo "[setup] build done in $(( $(date +%s) - start )) s"
python -m umm_ops info
