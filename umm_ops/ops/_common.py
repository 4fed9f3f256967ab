"""Shared plumbing of the public ops: input checks with clear errors, op definition helpers."""
from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

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


def check_eps(eps, name: str = "eps") -> float:
    """A finite float >= 0 (an int or float, not a bool, str or None)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{name} must be a finite number >= 0, got {eps!r} ({type(eps).__name__})")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {eps!r}")
    return float(eps)


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


kernels = kernels_for  # kernels(t, op): the kernel namespace of the backend selected for `op` on tensors like `t`


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


# ----------------------------------------------------------------------------------- eager calls
# Every public op is a torch.library custom op (so torch.compile traces it and opcheck checks it).  In plain eager
# mode the custom op's dispatch and its autograd wrapper cost 20 us per call on tiny inputs and up to 0.3-0.5 ms
# around a few-ms fwd+bwd on a CPU (bench/NOTES.md, tokenizer section) for no benefit, so eager calls skip them:
# the implementation runs directly when nothing needs a gradient, and through a plain autograd.Function with the
# custom op's own setup / backward when something does.  The kernels called, hence the results, are the same.
def eager_ok(x: torch.Tensor) -> bool:
    """Nothing is tracing (torch.compile, a dispatch mode such as FakeTensorMode) and x is a plain tensor."""
    return type(x) is torch.Tensor and not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None


def needs_grad(*ts) -> bool:
    if not torch.is_grad_enabled():
        return False
    for t in ts:  # a plain loop: a generator under any() costs several microseconds more between large kernels
        if isinstance(t, torch.Tensor) and t.requires_grad:
            return True
    return False


def register_autograd(op, name: str, impl, setup, backward):
    """Register `setup` (setup_context) and `backward` as custom op `op`'s autograd, and return the eager-mode
    twin: an autograd.Function named `name` running `impl` with the same `setup` and `backward` (the backward's
    kernels are picked with `backward_op(ctx, op, impl)`)."""
    op.register_autograd(backward, setup_context=setup)

    # forward(ctx, ...) style: a separate setup_context makes Function.apply bind arguments through
    # inspect.signature on every call (~40 us)
    def forward(ctx, *args):
        ctx.umm_eager = True
        out = impl(*args)
        setup(ctx, args, out)
        return out

    @torch.autograd.function.once_differentiable
    def bwd(ctx, *grads):
        return backward(ctx, *grads)

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(bwd)})


def backward_op(ctx, op, impl):
    """In a backward: the backward custom op, or its implementation when the forward ran eagerly."""
    return impl if getattr(ctx, "umm_eager", False) else op


def _first_tensor(args, kwargs):
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    for a in kwargs.values():
        if isinstance(a, torch.Tensor):
            return a
    return None


_any_autocast = torch._C._is_any_autocast_enabled


def autocast_policy(kind: str):
    """Decorator of a public op: its behaviour under ``torch.autocast``.

    "lower": floating tensor arguments are cast to the autocast dtype (the GEMM ops: span attention, compress /
    expand tokens, as autocast treats matmul and SDPA); "promote": to the widest floating dtype among them (the norm,
    gate, latent-packing and flow ops, as autocast treats layer_norm and elementwise ops).  The op then runs with
    autocast off: the kernels' own ATen calls (the tokens GEMMs) must not be re-cast behind their back (they size
    their buffers from the input dtype).  Outside autocast the op is called as it is."""
    if kind not in ("lower", "promote"):
        raise ValueError(kind)

    def wrap(fn):
        import functools

        @functools.wraps(fn)
        def op(*args, **kwargs):
            if not _any_autocast():   # the common case: one C call (~0.3 us), no argument scan
                return fn(*args, **kwargs)
            t = _first_tensor(args, kwargs)
            if t is None or not torch.is_autocast_enabled(t.device.type):
                return fn(*args, **kwargs)
            dev = t.device.type
            floats = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_floating_point()]
            if kind == "lower":
                dt = torch.get_autocast_dtype(dev)
            else:
                dt = max((a.dtype for a in floats), key=lambda d: torch.finfo(d).bits, default=None)

            def cast(a):
                return a.to(dt) if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != dt else a
            if dt is not None:
                args = tuple(cast(a) for a in args)
                kwargs = {k: cast(v) for k, v in kwargs.items()}
            with torch.autocast(dev, enabled=False):
                return fn(*args, **kwargs)
        return op
    return wrap


def dispatch(op, fn, impl, x: torch.Tensor, *args, grad: bool | None = None):
    """Run custom op `op` on args, or in eager mode (eager_ok(x)) its implementation / autograd.Function `fn`.
    grad: needs_grad(*args) when the caller has it already."""
    if eager_ok(x):
        if grad is None:
            grad = needs_grad(*args)
        return fn.apply(*args) if grad else impl(*args)
    return op(*args)
