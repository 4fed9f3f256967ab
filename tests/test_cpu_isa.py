"""The compiled CPU kernels' instruction-set variants (csrc/cpu/kernels.h, csrc/torch/cpu_dispatch.cpp).

Every kernel test through the "cpu" backend already runs once per variant this CPU supports (tests/conftest.py);
here: the selection API, the UMM_CPU_ISA environment variable, and that no AVX-512 instruction sits outside
the AVX-512 variant's namespace in the built module (a machine without AVX-512 must never reach one).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import umm_ops
from umm_ops import backend as B

pytestmark = pytest.mark.skipif(not umm_ops.backends()["extension"]["loaded"], reason="extension not loaded")


def test_variants_listed_and_selectable():
    built = umm_ops._C.cpu_isas_built()
    runnable = B.cpu_isas()
    assert runnable and set(runnable) <= set(built)
    assert B.cpu_isa() in runnable
    before = B.cpu_isa()
    for isa in runnable:
        with B.use_cpu_isa(isa):
            assert B.cpu_isa() == isa
        assert B.cpu_isa() == before
    B.set_cpu_isa("auto")
    try:
        assert B.cpu_isa() == runnable[-1]  # the widest
    finally:
        B.set_cpu_isa(before)
    rep = umm_ops.backends()["cpu"]
    assert rep["isa"] == before and rep["isas"] == runnable and rep["isas_built"] == built


def test_bad_names_are_clear():
    before = B.cpu_isa()
    with pytest.raises(ValueError, match=r"unknown CPU instruction set 'avx9000'; expected one of .*'auto'"):
        B.set_cpu_isa("avx9000")
    assert B.cpu_isa() == before  # unchanged


def _run(code: str, env_isa: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, UMM_CPU_ISA=env_isa)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_environment_variable():
    isa = B.cpu_isas()[0]  # the narrowest: differs from the default wherever two variants run
    code = ("import torch, umm_ops; from umm_ops import backend as B; print(B.cpu_isa());"
            "x = torch.randn(2, 5, 8); print(float(umm_ops.adaln_modulate(x, torch.randn(2, 8), torch.randn(2, 8)).sum()))")
    r = _run(code, isa)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == isa
    r = _run(code, "avx9000")
    assert r.returncode != 0
    assert "UMM_CPU_ISA" in r.stderr and "unknown CPU instruction set 'avx9000'" in r.stderr


def test_variants_agree_on_an_op(seed):
    """A quick cross-check (the per-variant tests against the float64 reference are the real ones)."""
    lay = umm_ops.SpanLayout.from_segments([[(37, "causal"), (64, "full"), (9, "noise")], [(50, "full"), (20, "causal")]])
    q, k, v = torch.randn(180, 4, 72), torch.randn(180, 2, 72), torch.randn(180, 2, 72)
    outs = []
    for isa in B.cpu_isas():
        with B.use_cpu_isa(isa), umm_ops.use_backend("cpu"):
            outs.append(umm_ops.span_attention(q, k, v, lay))
    with umm_ops.use_backend("reference"):
        ref = umm_ops.span_attention(q.double(), k.double(), v.double(), lay)
    for o in outs:
        torch.testing.assert_close(o.double(), ref, atol=2e-5, rtol=2e-5)


_PREFIXES = {"26", "2e", "36", "3e", "64", "65", "66", "67", "f0", "f2", "f3"}


def test_no_avx512_outside_its_variant():
    """EVEX-encoded (AVX-512) instructions may only appear in functions of namespace umm::cpu::v4 (and what the
    compiler outlined from them): anything else - our glue, or a standard-library / c10 inline function the
    linker kept from the v4 objects - would crash on a CPU without AVX-512 (CMakeLists.txt: link order)."""
    built = umm_ops._C.cpu_isas_built()
    if "x86-64-v4" not in built or built[0] != "x86-64-v3":
        pytest.skip(f"needs the x86-64-v3 + x86-64-v4 build (this one: {built})")
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) not installed")
    so = umm_ops._C.__file__
    proc = subprocess.Popen([objdump, "-d", "-C", "-w", "--section=.text", so], stdout=subprocess.PIPE, text=True)
    func, bad, v4_evex, named = None, {}, 0, 0
    head = re.compile(r"^[0-9a-f]+ <(.*)>:$")
    for line in proc.stdout:
        m = head.match(line)
        if m:
            func = m.group(1)
            named += "umm::cpu::" in func
            continue
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        bytes_ = parts[1].split()
        i = 0
        while i < len(bytes_) and bytes_[i] in _PREFIXES:
            i += 1
        if i < len(bytes_) and bytes_[i] == "62":  # EVEX (0x62 is no valid opcode in 64-bit mode otherwise)
            # demangled names, and OpenMP-outlined bodies (mangled name + "._omp_fn.N", left undemangled)
            if func is not None and ("umm::cpu::v4::" in func or "3umm3cpu2v4" in func):
                v4_evex += 1
            else:
                bad.setdefault(func, parts[2].strip())
    assert proc.wait() == 0
    if named == 0:
        pytest.skip(f"{so} has no symbol table (stripped): functions cannot be told apart")
    assert v4_evex > 1000, f"only {v4_evex} AVX-512 instructions in umm::cpu::v4: is the v4 variant vectorised?"
    assert not bad, f"AVX-512 instructions outside umm::cpu::v4 (first of each): {list(bad.items())[:10]}"
