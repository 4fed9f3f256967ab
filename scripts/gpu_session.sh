#!/usr/bin/env bash
# What a session with a lent GPU runs first (see ../shared/design/gpu.md), in one call of the device tool:
#   build for the device's arch, report, run the CUDA and Triton tests on the device, a compute-sanitizer
#   memcheck pass over the CUDA tests, then the full benchmark sweep.  Everything it writes lands in $OUT
#   (when set) so it comes back: logs, bench/results/<device>.json and .png.
# Usage on the device machine:  bash scripts/gpu_session.sh [arch, default 90a]
# The device has no network and lacks hypothesis / matplotlib / rich / nvidia-cutlass (and the model's
# safetensors / transformers / diffusers): download their wheels here first and carry them (.whl/ is git-ignored;
# name it in the device tool's `carry`, 64 MiB at most - check `du -sh .whl`):
#   pip download --only-binary=:all: --python-version 3.12 -d .whl hypothesis matplotlib rich safetensors \
#       transformers "diffusers>=0.42"
#   pip download --no-deps -d .whl nvidia-cutlass==4.2.0.0
# Without them the property tests are skipped, the benchmark writes no plot (JSON and table still), the
# model tests fail to import, and the CUDA kernels that need CuTe (span attention, tokens GEMM) are not built.
set -uo pipefail
cd "$(dirname "$0")/.."
ARCH=${1:-90a}
OUT=${OUT:-/tmp/umm_gpu_out}
mkdir -p "$OUT"
export UMM_CUDA=ON UMM_CUDA_ARCHS="$ARCH"
step() { echo "== $*" | tee -a "$OUT/summary.txt"; }
if [ -d .whl ]; then
  python -m pip install -q --no-index --find-links .whl hypothesis matplotlib rich || true
  python -m pip install -q --no-index --find-links .whl safetensors transformers "diffusers>=0.42" || true
  python -m pip install -q --no-index --no-deps --find-links .whl nvidia-cutlass==4.2.0.0 || true
fi
step "build (archs $ARCH)"
python -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
python -m umm_ops info | tee "$OUT/info.txt"
step "tests on the device (cuda or triton)"
python -m pytest -q tests -m "cuda or triton" -p no:cacheprovider > "$OUT/tests_gpu.log" 2>&1
echo "rc=$?" | tee -a "$OUT/summary.txt"; tail -5 "$OUT/tests_gpu.log" | tee -a "$OUT/summary.txt"
step "whole test suite"
python -m pytest -q tests -p no:cacheprovider > "$OUT/tests_all.log" 2>&1
echo "rc=$?" | tee -a "$OUT/summary.txt"; tail -3 "$OUT/tests_all.log" | tee -a "$OUT/summary.txt"
if command -v compute-sanitizer > /dev/null; then
  step "compute-sanitizer memcheck over the CUDA tests"
  UMM_OPS_BACKEND=cuda compute-sanitizer --tool memcheck --error-exitcode 9 \
    python -m pytest -q -x tests/test_flow.py tests/test_norm.py tests/test_tokens.py -k "cuda" -p no:cacheprovider \
    > "$OUT/memcheck.log" 2>&1
  echo "rc=$?" | tee -a "$OUT/summary.txt"; tail -5 "$OUT/memcheck.log" | tee -a "$OUT/summary.txt"
  step "compute-sanitizer memcheck over the CUDA span-attention tests (never run before: correctness first)"
  UMM_OPS_BACKEND=cuda compute-sanitizer --tool memcheck --error-exitcode 9 \
    python -m pytest -q -x tests/test_span_cuda.py -p no:cacheprovider > "$OUT/memcheck_span.log" 2>&1
  echo "rc=$?" | tee -a "$OUT/summary.txt"; tail -5 "$OUT/memcheck_span.log" | tee -a "$OUT/summary.txt"
fi
step "span layout build time, model training step (small preset, bf16)"
python bench/bench_layout.py > "$OUT/bench_layout.log" 2>&1; tail -4 "$OUT/bench_layout.log" | tee -a "$OUT/summary.txt"
python bench/bench_model.py --preset small --dtype bfloat16 > "$OUT/bench_model.log" 2>&1
echo "rc=$?" | tee -a "$OUT/summary.txt"; tail -8 "$OUT/bench_model.log" | tee -a "$OUT/summary.txt"
step "benchmarks (full sweep)"
python bench/run.py > "$OUT/bench.log" 2>&1
echo "rc=$?" | tee -a "$OUT/summary.txt"
cp bench/results/*.json bench/results/*.png "$OUT/" 2>/dev/null
tail -60 "$OUT/bench.log"
