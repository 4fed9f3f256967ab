"""Importing umm_ops' Triton kernels so that they run in the Triton interpreter (CPU-only test modules).

Call at the top of a test module, before anything else imports triton:
    flow, tk = interpreted_modules("umm_ops.triton.flow", "umm_ops.triton", reason="...")
With a GPU present the module is skipped (the interpreter would take over the whole process; the device tests
cover the kernels there).
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch


def interpreted_modules(*names: str, reason: str):
    if torch.cuda.is_available():
        pytest.skip(reason, allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"
    pytest.importorskip("triton")
    mods = [importlib.import_module(n) for n in names]
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        return mods
    # triton.jit picks the interpreter when a kernel is *defined*: modules imported earlier in this process
    # without TRITON_INTERPRET=1 are re-imported, in the order given (dependencies first).
    compiled = [v for m in mods for v in vars(m).values()
                if type(v).__name__ == "JITFunction" and not isinstance(v, InterpretedFunction)]
    if compiled:
        mods = [importlib.reload(m) for m in mods]
    return mods
