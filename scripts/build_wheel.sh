#!/usr/bin/env bash
# Builds the umm_ops wheel that users install:  pip install "umm_ops-<version>-<tag>.whl[all]"
#   - the C++ CPU kernels for both instruction-set variants on x86-64 (x86-64-v3 = AVX2 + FMA, and x86-64-v4 =
#     AVX-512, chosen at run time);
#   - the CUDA kernels for sm_80 and sm_90a when nvcc is found (UMM_CUDA=ON then: a missing nvidia-cutlass is an
#     error, not a wheel without the span-attention kernel);
#   - compiled against the torch of the build environment (.venv from scripts/setup.sh, or $PYTHON), whose
#     release the wheel then requires (torch==X.Y.*) and records in umm_ops/_torch_build.py.
# Usage: bash scripts/build_wheel.sh [out_dir]      (default: dist/)
# Environment: PYTHON (default .venv/bin/python), UMM_CUDA_ARCHS (default "80;90a"), UMM_CUDA (default ON when nvcc
# is on PATH, else AUTO), UMM_CPU_ARCH (default x86-64-v3).
# It builds in build/<wheel tag>, the folder scripts/setup.sh's build uses, so after setup only what changed is
# compiled (CI relies on this: tests/test_wheel.py).
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mkdir -p "${1:-dist}" && cd "${1:-dist}" && pwd)
PY=${PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ] && ! command -v "$PY" >/dev/null; then
  echo "[build_wheel] no Python at $PY: run scripts/setup.sh first, or set PYTHON to one that has torch" >&2
  exit 2
fi
if ! "$PY" -c "import torch, scikit_build_core" 2>/dev/null; then
  echo "[build_wheel] $PY needs torch and scikit-build-core (scripts/setup.sh installs them)" >&2
  exit 2
fi
export UMM_CUDA_ARCHS=${UMM_CUDA_ARCHS:-80;90a}
if [ -z "${UMM_CUDA:-}" ]; then
  if command -v nvcc >/dev/null || [ -n "${CUDACXX:-}" ]; then UMM_CUDA=ON; else UMM_CUDA=AUTO; fi
fi
export UMM_CUDA
case "$(uname -m)" in
  x86_64|AMD64) export UMM_CPU_AVX512=${UMM_CPU_AVX512:-ON} ;;
  *) export UMM_CPU_AVX512=${UMM_CPU_AVX512:-AUTO} ;;
esac
torch_version=$("$PY" -c "import torch; print(torch.__version__)")
echo "[build_wheel] torch $torch_version; UMM_CUDA=$UMM_CUDA UMM_CUDA_ARCHS=$UMM_CUDA_ARCHS UMM_CPU_AVX512=$UMM_CPU_AVX512"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
start=$(date +%s)
before=$(ls "$out"/umm_ops-*.whl 2>/dev/null || true)
# --no-build-isolation: compile against (and pin) the torch installed here, not one an isolated build would fetch
if ! "$PY" -m pip wheel -v --no-build-isolation --no-deps -w "$out" . >"$log" 2>&1; then
  tail -n 60 "$log" >&2
  echo "[build_wheel] FAILED (the last 60 lines of pip's output are above)" >&2
  exit 1
fi
grep -E "umm_ops: (CPU|CUDA|torch)" "$log" | sed 's/^.*umm_ops:/[build_wheel] cmake:/' | sort -u || true
wheel=$(ls -t "$out"/umm_ops-*.whl | head -n 1)
size=$(stat -c %s "$wheel")
echo "[build_wheel] built in $(( $(date +%s) - start )) s: $wheel"
echo "[build_wheel] size: $(( size / 1024 )) KiB ($(awk -v s="$size" 'BEGIN { printf "%.1f", s / 1048576 }') MiB)"
"$PY" - "$wheel" <<'EOF'
import sys, zipfile
w = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in w.namelist() if n.endswith(".dist-info/METADATA"))
reqs = [l.split(":", 1)[1].strip() for l in w.read(meta).decode().splitlines() if l.startswith("Requires-Dist:")]
print("[build_wheel] requires:", ", ".join(r for r in reqs if "extra ==" not in r))
ext = [i for i in w.infolist() if "/_C." in i.filename and i.filename.endswith(".so")]
for i in ext:
    print(f"[build_wheel] {i.filename}: {i.file_size / 1048576:.1f} MiB uncompressed")
print("[build_wheel] extras:", ", ".join(l.split(":", 1)[1].strip() for l in w.read(meta).decode().splitlines()
                                        if l.startswith("Provides-Extra:")))
EOF
