"""Loads the compiled extension umm_ops._C (torch must be imported first: the module has no RPATH to torch/lib).

A missing or broken extension never breaks ``import umm_ops``: the reference (and Triton) backends still
work, ``umm_ops.backends()`` says why the compiled kernels are unavailable, and forcing them raises.
"""
from __future__ import annotations

import functools

import torch  # noqa: F401  (loads libtorch / libc10 before the extension)

_error: str | None = None
try:
    from . import _C  # noqa: F401  (registers torch.ops.umm_ops.kernel_*)
except Exception as e:  # pragma: no cover - exercised when the package is used without building
    _error = f"{type(e).__name__}: {e}"


def loaded() -> bool:
    return _error is None


def load_error() -> str | None:
    return _error


@functools.cache
def build_info() -> dict:
    """Parsed torch.ops.umm_ops.build_info(): {'torch': ..., 'cpu': 1, 'cuda': 0/1, 'cuda_archs': ...}."""
    if not loaded():
        return {}
    out = {}
    for kv in torch.ops.umm_ops.build_info().split(";"):
        k, _, v = kv.partition("=")
        out[k] = int(v) if v.isdigit() and k != "cuda_archs" else v
    return out
