"""Backend selection: which implementation of a kernel runs.

Order when nothing is forced (per call, from the first tensor's device and dtype):
  CUDA tensor: "cuda" (compiled kernels) -> "triton" -> "reference"
  CPU tensor:  "cpu" (compiled C++ kernels) -> "reference"
  float64:     "reference" (the only backend that computes in float64)
Triton runs on CPU tensors only through its interpreter (TRITON_INTERPRET=1) and only when forced.

The compiled CPU kernels come in instruction-set variants ("x86-64-v3": AVX2 + FMA, and "x86-64-v4": AVX-512,
on x86-64); the widest one the CPU supports runs unless ``UMM_CPU_ISA`` or ``set_cpu_isa`` / ``use_cpu_isa``
names another (``cpu_isas()`` lists what can run here).

Force a backend for a block of code with ``with umm_ops.use_backend("triton"): ...`` or for the process with
the environment variable ``UMM_OPS_BACKEND=cpu|cuda|triton|reference|auto``.  Forcing a backend that
cannot run the given tensors raises ``BackendUnavailableError`` saying why.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import platform

import torch

from . import _lib

BACKENDS = ("cuda", "triton", "cpu", "reference")
_ENV = "UMM_OPS_BACKEND"
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("umm_ops_backend", default=None)
_value_checks: contextvars.ContextVar[bool | None] = contextvars.ContextVar("umm_ops_value_checks", default=None)


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the given inputs on this machine."""


def _check_name(name: str) -> str:
    if name not in BACKENDS and name != "auto":
        raise ValueError(f"unknown umm_ops backend {name!r}: expected one of {', '.join(BACKENDS)} or 'auto'")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Force backend `name` ("cuda", "triton", "cpu", "reference" or "auto") inside the block."""
    token = _forced.set(_check_name(name))
    try:
        yield
    finally:
        _forced.reset(token)


# os.environ.get of a variable that is not set raises and catches a KeyError inside the Mapping: ~14 us when it
# runs between large kernels (measured, see kernels_for).  Every op call reads UMM_OPS_BACKEND, so it reads the
# dict behind os.environ (CPython's _Environ, updated by os.environ[...] = / putenv through it) directly.
try:
    _ENV_DATA, _ENV_KEY, _ENV_DECODE = os.environ._data, os.environ.encodekey(_ENV), os.environ.decodevalue
except AttributeError:  # not CPython's _Environ
    _ENV_DATA = None


def _env_backend() -> str:
    if _ENV_DATA is None:
        return os.environ.get(_ENV, "")
    v = _ENV_DATA.get(_ENV_KEY)
    return _ENV_DECODE(v) if v else ""


def forced_backend() -> str | None:
    name = _forced.get()
    if name is None:
        env = _env_backend().strip().lower()
        name = _check_name(env) if env else None
    return None if name == "auto" else name


@contextlib.contextmanager
def value_checks(enabled: bool):
    """Turn the value checks of the public ops (t in [0, 1], finite sigma, ...) on or off in the block.

    They are on by default (env UMM_OPS_CHECK_VALUES=0 turns them off); on CUDA tensors they synchronise
    the device once per call, so a tuned training loop may want them off.  Shape/dtype/device checks always run.
    """
    token = _value_checks.set(bool(enabled))
    try:
        yield
    finally:
        _value_checks.reset(token)


def _has_values(t) -> bool:
    """False for tensors without data to read: meta tensors and fake tensors (torch.compile / opcheck tracing)."""
    if not isinstance(t, torch.Tensor):
        return True
    if t.device.type == "meta":
        return False
    from torch._subclasses.fake_tensor import FakeTensor

    return not isinstance(t, FakeTensor)


def value_checks_enabled(*tensors) -> bool:
    """Whether the public ops' value checks run now (and can read the values of `tensors`: never for meta or
    fake tensors, whose values do not exist)."""
    if torch.compiler.is_compiling():  # value checks would graph-break (they read tensor values)
        return False
    if not all(_has_values(t) for t in tensors):
        return False
    v = _value_checks.get()
    if v is None:
        v = os.environ.get("UMM_OPS_CHECK_VALUES", "1").strip() not in ("0", "false", "off", "no")
    return v


@functools.cache
def _triton_module():
    try:
        return importlib.import_module("umm_ops.triton")
    except Exception as e:  # triton missing or broken: report, never crash the import
        return e


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache  # asked on every op call; the registrations are fixed once umm_ops is imported
def _has_op(name: str, op: str) -> bool:
    """Whether backend `name` implements kernel `op` (ops land backend by backend)."""
    if name == "reference":
        return True
    if name in ("cpu", "cuda"):
        try:
            return torch._C._dispatch_has_kernel_for_dispatch_key(f"umm_ops::kernel_{op}", name.upper())
        except RuntimeError:  # op not defined at all
            return False
    mod = _triton_module()
    return not isinstance(mod, Exception) and callable(getattr(mod, op, None))


def _span_cuda_limits(dtype: torch.dtype, shape) -> str | None:
    """The CUDA span-attention kernel (csrc/cuda/span_attention.cu): tensor cores, bf16/fp16, head dim % 8 == 0 and
    <= 128.  Anything else falls through to the next backend (Triton) when nothing is forced."""
    if dtype not in (torch.bfloat16, torch.float16):
        return (f"the CUDA span-attention kernel runs bfloat16 / float16 (tensor cores), got "
                f"{str(dtype).replace('torch.', '')}")
    if shape is not None and (shape[-1] % 8 or shape[-1] > 128):
        return f"the CUDA span-attention kernel needs a head dim that is a multiple of 8 and <= 128, got {shape[-1]}"
    return None


# (backend, kernel op) -> limits(dtype, shape or None) -> reason or None: kernels that cover only part of the
# dtypes / shapes the op accepts
_OP_LIMITS = {("cuda", "span_attention_fwd"): _span_cuda_limits, ("cuda", "span_attention_bwd"): _span_cuda_limits}


def _why_not(name: str, device: torch.device, dtype: torch.dtype, op: str | None = None, shape=None) -> str | None:
    """None when backend `name` can run `op` on tensors of this device/dtype (and shape, when given), else the
    reason."""
    why = _why_not_device(name, device, dtype)
    if why is None and op is not None and not _has_op(name, op):
        why = f"the {name!r} backend has no {op!r} kernel (yet)"
    if why is None and op is not None and (name, op) in _OP_LIMITS:
        why = _OP_LIMITS[(name, op)](dtype, shape)
    return why


def _why_not_device(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    if name == "reference":
        return None
    if dtype == torch.float64:
        return "float64 inputs run on the reference backend only (kernels support float32, bfloat16, float16)"
    if name == "cpu":
        if device.type != "cpu":
            return f"the 'cpu' backend runs CPU tensors, got a tensor on {device}"
        return None if _lib.loaded() else f"the compiled extension umm_ops._C did not load: {_lib.load_error()}"
    if name == "cuda":
        if device.type != "cuda":
            return f"the 'cuda' backend runs CUDA tensors, got a tensor on {device}"
        if not _lib.loaded():
            return f"the compiled extension umm_ops._C did not load: {_lib.load_error()}"
        if not _lib.build_info().get("cuda"):
            return "umm_ops was built without CUDA kernels (no nvcc at build time, or UMM_CUDA=OFF)"
        return None
    if name == "triton":
        mod = _triton_module()
        if isinstance(mod, Exception):
            return f"triton is not importable: {mod}"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreting():
            return None
        return f"triton runs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got a tensor on {device}"
    raise ValueError(name)


def select(device: torch.device, dtype: torch.dtype, op: str | None = None, shape=None) -> str:
    """The backend that will run kernel `op` (any op when None) on tensors of this device, dtype (and shape)."""
    name = forced_backend()
    if name is not None:
        why = _why_not(name, device, dtype, op, shape)
        if why is not None:
            raise BackendUnavailableError(f"umm_ops backend {name!r} was forced but cannot run here: {why}")
        return name
    order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
    for cand in order:
        if _why_not(cand, device, dtype, op, shape) is None:
            return cand
    return "reference"


class _CppKernels:
    """torch.ops.umm_ops.kernel_<name> as attribute <name> (looked up once, then a plain instance attribute)."""

    def __getattr__(self, name):
        fn = getattr(torch.ops.umm_ops, "kernel_" + name)
        setattr(self, name, fn)
        return fn


_CPP_KERNELS = _CppKernels()


def kernels(name: str):
    """The kernel-contract namespace of a backend (see umm_ops/reference/kernels.py)."""
    if name in ("cpu", "cuda"):
        return _CPP_KERNELS
    if name == "triton":
        mod = _triton_module()
        if isinstance(mod, Exception):
            raise BackendUnavailableError(f"triton is not importable: {mod}")
        return mod
    from .reference import kernels as ref

    return ref


# (device type, dtype, op) -> kernel namespace of the automatic choice, for ops whose choice does not depend on
# the shape.  Why: every op call selects its backend, and the selection's few microseconds of Python cost 10x
# more when they run between large kernels than in a tight loop (cold caches and branch predictors): ~35 us
# measured around a 0.35 ms bf16 expand_tokens on the 2-core CPU (bench/NOTES.md, tokens v3).
_AUTO_CACHE: dict = {}


def kernels_for(t: torch.Tensor, op: str | None = None):
    """The kernel namespace of the backend selected for `op` on tensors like `t`."""
    if _forced.get() is None and not _env_backend():
        # (t.device builds a torch.device object: slower).  Every other device type (meta, mps, ...) gets the
        # reference backend from select(), so they may share the (False, False) key.
        key = (t.is_cuda, t.is_cpu, t.dtype, op)
        ns = _AUTO_CACHE.get(key)
        if ns is None:
            name = select(t.device, t.dtype, op, tuple(t.shape))
            ns = kernels(name)
            if not any((cand, op) in _OP_LIMITS for cand in BACKENDS):
                _AUTO_CACHE[key] = ns
        return ns
    return kernels(select(t.device, t.dtype, op, tuple(t.shape)))


def _cpu_c():
    if not _lib.loaded():
        raise BackendUnavailableError(f"the compiled extension umm_ops._C did not load: {_lib.load_error()}")
    from . import _C

    return _C


def cpu_isa() -> str:
    """The instruction-set variant the compiled CPU kernels run ("x86-64-v3", "x86-64-v4", ...)."""
    return _cpu_c().cpu_isa()


def cpu_isas() -> list[str]:
    """The variants built into this module that this CPU can run, narrowest first."""
    return list(_cpu_c().cpu_isas())


def set_cpu_isa(name: str) -> None:
    """Run the CPU kernels' variant `name` (one of ``cpu_isas()``, or "auto" for the widest) from now on,
    process-wide.  Results agree across variants to float rounding (sums are vectorised at different widths)."""
    _cpu_c().set_cpu_isa(name)


@contextlib.contextmanager
def use_cpu_isa(name: str):
    """``set_cpu_isa(name)`` inside the block, the previous variant restored after it (process-wide, not
    per thread)."""
    before = cpu_isa()
    set_cpu_isa(name)
    try:
        yield
    finally:
        set_cpu_isa(before)


def backends() -> dict:
    """What was compiled and what can run here."""
    info = _lib.build_info() if _lib.loaded() else {}
    cuda_dev = torch.cuda.is_available()
    tri = _triton_module()
    tri_ok = not isinstance(tri, Exception)
    report = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(0) if cuda_dev else f"cpu ({platform.processor() or platform.machine()})",
        "cpu_threads": torch.get_num_threads(),
        "extension": {"loaded": _lib.loaded(), "error": _lib.load_error(), "built_against_torch": info.get("torch")},
        "cpu": {"compiled": _lib.loaded(), "runnable": _lib.loaded(),
                "isa": cpu_isa() if _lib.loaded() else None, "isas": cpu_isas() if _lib.loaded() else [],
                "isas_built": list(_cpu_c().cpu_isas_built()) if _lib.loaded() else []},
        "cuda": {
            "compiled": bool(info.get("cuda")),
            "archs": info.get("cuda_archs"),
            "device_available": cuda_dev,
            "runnable": bool(info.get("cuda")) and cuda_dev,
        },
        "triton": {
            "installed": tri_ok,
            "version": _triton_version(),
            "error": None if tri_ok else str(tri),
            "interpreter": triton_interpreting(),
            "runnable": tri_ok and (cuda_dev or triton_interpreting()),
        },
        "reference": {"runnable": True},
        "kernels": kernel_matrix(),
        "forced": forced_backend(),
        "auto": {
            "cpu": select(torch.device("cpu"), torch.float32) if forced_backend() is None else None,
            "cuda": (select(torch.device("cuda"), torch.float32) if cuda_dev and forced_backend() is None else None),
        },
    }
    return report


def kernel_names() -> list[str]:
    """Every kernel of the contract (the reference implements them all)."""
    from .reference import kernels as ref

    return sorted(ref.KERNELS)


def kernel_matrix() -> dict:
    """{kernel: [backends that implement it]} - ops land backend by backend."""
    return {op: [b for b in BACKENDS if _has_op(b, op)] for op in kernel_names()}


def _triton_version():
    try:
        import triton

        return triton.__version__
    except Exception:
        return None
