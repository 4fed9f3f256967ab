"""pytest-benchmark setup: `--quick` (or UMM_BENCH_QUICK=1) runs the small built-in default."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", default=False, help="small sizes, few rounds")
    parser.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when available)")


def pytest_configure(config):
    if config.getoption("--quick"):
        os.environ["UMM_BENCH_QUICK"] = "1"
    if config.getoption("--bench-device"):
        os.environ["UMM_BENCH_DEVICE"] = config.getoption("--bench-device")


@pytest.fixture(autouse=True)
def _case_extra_info(request):
    """Cases that carry extra fields (span attention: allowed_pairs, heads, head dim) add them to the benchmark's
    extra_info after the test body (which sets the common fields); bench/run.py reads them."""
    yield
    callspec = getattr(request.node, "callspec", None)
    case = callspec.params.get("case") if callspec else None
    bench = request.node.funcargs.get("benchmark")
    extra = getattr(case, "extra_info", None)
    if bench is not None and isinstance(extra, dict):
        bench.extra_info.update(extra)
