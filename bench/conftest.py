"""pytest-benchmark setup: `--quick` (or UMM_BENCH_QUICK=1) runs the small built-in default."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", default=False, help="small sizes, few rounds")
    parser.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when available)")


def pytest_configure(config):
    if config.getoption("--quick"):
        os.environ["UMM_BENCH_QUICK"] = "1"
    if config.getoption("--bench-device"):
        os.environ["UMM_BENCH_DEVICE"] = config.getoption("--bench-device")
