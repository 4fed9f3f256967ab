"""Shared test fixtures: devices, backends, fresh-but-reproducible random seeds, tolerance rule."""
from __future__ import annotations

import os
import random

import pytest
import torch

# Without a GPU the Triton kernels run through the Triton interpreter on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import umm_ops  # noqa: E402
from umm_ops import backend as _backend  # noqa: E402

# Fresh inputs every run, reproducible on demand: UMM_TEST_SEED=<printed value> pytest ...
BASE_SEED = int(os.environ.get("UMM_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    info = umm_ops.backends()
    return [
        f"umm_ops: UMM_TEST_SEED={BASE_SEED} (set it to replay this run's random inputs)",
        f"umm_ops: extension loaded={info['extension']['loaded']} cuda compiled={info['cuda']['compiled']} "
        f"archs={info['cuda']['archs']} triton={info['triton']['runnable']} device={info['device']}",
    ]


@pytest.fixture
def seed(request):
    s = (BASE_SEED + hash(request.node.nodeid) % 100003) % (2**31)
    torch.manual_seed(s)
    return s


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backends_for(device: str) -> list:
    """(backend, marks) pairs that can run tensors of `device` here."""
    out = []
    for name in ("cuda", "cpu", "triton", "reference"):
        if _backend._why_not(name, torch.device(device), torch.float32) is None:
            marks = [pytest.mark.triton] if name == "triton" else []
            if name == "cuda":
                marks.append(pytest.mark.cuda)
            out.append(pytest.param(device, name, marks=marks, id=f"{device}-{name}"))
    return out


def device_backend_params():
    return [p for d in DEVICES for p in backends_for(d)]


def dtypes_for(device: str, backend: str):
    if backend == "reference":
        return [torch.float32, torch.bfloat16]
    return [torch.float32, torch.bfloat16, torch.float16]
