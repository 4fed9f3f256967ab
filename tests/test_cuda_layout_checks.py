"""Host-side checks of the CuTe layout arithmetic of the CUDA tensor-core kernels, runnable without a GPU.

csrc/cuda/checks/*.cu are small host programs (not part of the library build) that instantiate the kernels' CuTe
layouts, MMA / copy partitions and chunk maps and check coverage / alignment by enumeration.  This compiles and
runs the tokens gather-GEMM one (the span-attention one runs in tests/test_span_cuda_tiling.py).  Skipped without
nvcc or the CUTLASS headers.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _toolchain():
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    try:
        import cutlass_library
        cutlass = Path(cutlass_library.__file__).parent / "source" / "include"
    except ImportError:
        cutlass = None
    if nvcc is None or cutlass is None or not (cutlass / "cute").is_dir():
        pytest.skip("needs nvcc and the nvidia-cutlass headers")
    return nvcc, cutlass


def test_tokens_gemm_layout_check(tmp_path):
    nvcc, cutlass = _toolchain()
    src = ROOT / "csrc" / "cuda" / "checks" / "tokens_gemm_layout.cu"
    exe = tmp_path / "tokens_gemm_layout"
    cmd = [nvcc, "-std=c++17", "-O0", "--expt-relaxed-constexpr", "-I", str(ROOT / "csrc" / "include"), "-I",
           str(ROOT / "csrc" / "cuda"), "-I", str(cutlass), str(src), "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, f"compile failed:\n{build.stdout}\n{build.stderr}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "all layout checks passed" in run.stdout, run.stdout + run.stderr
