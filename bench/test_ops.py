"""Micro-benchmarks of every umm_ops op against eager PyTorch and torch.compile (pytest-benchmark).

Run through bench/run.py, which also writes bench/results/<device>.json and the plot.
"""
from __future__ import annotations

import os

import pytest
import torch

import umm_ops
from cases import copy_case, make_cases
from span_cases import make_span_cases
from tokens_cases import make_tokens_cases

QUICK = os.environ.get("UMM_BENCH_QUICK") == "1"
DEVICE = os.environ.get("UMM_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
CASES = [copy_case(DEVICE, QUICK)] + make_cases(DEVICE, QUICK)
CASES += make_span_cases(DEVICE, QUICK)
CASES += make_tokens_cases(DEVICE, QUICK)
PARAMS = [pytest.param(c, name, id=f"{c.id}-{name}") for c in CASES for name in c.impls]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("case,impl", PARAMS)
def test_op(benchmark, case, impl):
    torch.manual_seed(0)
    inputs = case.make()
    fn = case.impls[impl]

    def run():
        out = fn(*inputs)
        _sync()
        return out

    # value checks read tensor values (a device sync on GPU): off, as in a tuned training loop
    with umm_ops.value_checks(False):
        for _ in range(2 if impl != "compile" else 3):  # warm-up (and compile)
            run()
        rounds = (50 if QUICK else 30) if DEVICE == "cuda" else (15 if QUICK else 10)
        benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(
        op=case.op, direction=case.direction, images=case.images, dtype=str(case.dtype).replace("torch.", ""),
        device=DEVICE, shape=case.shape, bytes=case.bytes, impl=impl, case=case.id,
    )
