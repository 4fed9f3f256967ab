"""Helpers shared by the kernel-contract references (``kernels``, ``attention``): their own module, so that
both import them at the top without importing each other."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def _autograd_on():
    """Grad mode with the autograd dispatch keys re-included.

    These functions run as the implementation of a custom op (umm_ops.ops), below the autograd layer where
    torch excludes the autograd keys: enable_grad alone would record nothing.
    """
    keys = torch._C.DispatchKey
    with contextlib.ExitStack() as stack:
        for k in (keys.AutogradCPU, keys.AutogradCUDA, keys.ADInplaceOrView, keys.AutogradFunctionality):
            stack.enter_context(torch._C._SetExcludeDispatchKeyGuard(k, False))
        stack.enter_context(torch.enable_grad())
        yield


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Compute dtype: float32 for reduced-precision activations, the activation dtype otherwise."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
