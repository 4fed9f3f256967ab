"""Shared plumbing of the public ops: input checks with clear errors, op definition helpers."""
from __future__ import annotations

import torch

from .. import _lib
import contextlib

from ..backend import forced_backend, kernels_for, use_backend

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ALL_DTYPES = KERNEL_DTYPES + (torch.float64,)


def check_tensor(t, name: str, *, dtypes=ALL_DTYPES, min_dim: int = 0, dim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dims, got shape {tuple(t.shape)}")
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got shape {tuple(t.shape)}")
    return t


def check_like(t, ref: torch.Tensor, name: str, ref_name: str, *, shape: bool = True) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")
    if shape and t.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")
    return t


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """(B, C) modulation tensors may have any row stride but need unit column stride (else one copy)."""
    if t.dim() == 2 and (t.shape[1] <= 1 or t.stride(1) == 1) and (t.shape[0] <= 1 or t.stride(0) >= t.shape[1]):
        return t
    return t.contiguous()


def kernels(t: torch.Tensor, op: str):
    """The kernel namespace of the backend selected for `op` on tensors like `t`."""
    return kernels_for(t, op)


def register_fake_both(name: str, fn):
    """Register `fn` as the fake kernel of the public op umm_ops::name and of the C++ op umm_ops::kernel_name."""
    torch.library.register_fake(f"umm_ops::{name}", fn)
    if _lib.loaded():
        torch.library.register_fake(f"umm_ops::kernel_{name}", fn)


def remember_backend(ctx) -> None:
    """Called in setup_context: the backward runs on the backend that was forced for the forward (if any)."""
    ctx.umm_backend = forced_backend()


def backward_scope(ctx):
    """Context for a backward call: re-forces the forward's backend (eager autograd runs the backward later,
    usually outside the user's ``use_backend`` block).  Under torch.compile the compiled backward runs outside
    this scope and uses the automatic choice."""
    name = getattr(ctx, "umm_backend", None)
    return use_backend(name) if name else contextlib.nullcontext()
