"""Triton backend of the umm_ops kernel contract (see umm_ops/reference/kernels.py).

The kernel-contract functions below have exactly the signatures and return conventions of
``umm_ops.reference.kernels``.  They run on CUDA tensors, or on CPU tensors under the Triton
interpreter (TRITON_INTERPRET=1, set before triton is imported).  Only the interpreter path has been
exercised so far; the GPU path has not been run.

Importing this package raises ImportError (MissingDependencyError, naming umm_ops[triton]) when triton is not
installed (umm_ops.backend relies on that to fall back to another backend); ``available()`` additionally requires
a CUDA device or the interpreter.
"""
from __future__ import annotations

import importlib.util
import os

__all__ = [
    "available",
    "interpreting",
    "flow_step",
    "flow_step_backward",
    "flow_logprob",
    "flow_logprob_backward",
    "flow_kl",
    "flow_kl_backward",
    "gated_detail_residual",
    "gated_detail_residual_backward",
    "adaln_modulate",
    "adaln_modulate_backward",
    "gated_residual",
    "gated_residual_backward",
    "span_attention_fwd",
    "span_attention_bwd",
    "compress_tokens",
    "compress_tokens_backward",
    "expand_tokens",
    "expand_tokens_backward",
    "pack_latents",
    "pack_latents_backward",
    "unpack_latents",
    "unpack_latents_backward",
    "linear_cross_entropy",
    "linear_cross_entropy_backward",
    "linear_logprob",
    "linear_logprob_backward",
]

_HAVE_TRITON = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when the Triton interpreter is requested (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    """triton importable AND (a CUDA device is present OR the interpreter is requested)."""
    if not _HAVE_TRITON:
        return False
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    if interpreting():
        return True
    import torch

    return bool(torch.cuda.is_available())


if not _HAVE_TRITON:
    # umm_ops.backend treats an import error of this package as "triton backend unavailable"; the error
    # (MissingDependencyError, an ImportError) names the extra that installs triton: umm_ops[triton]
    from ..utils import optional_import

    optional_import("triton")

from .flow import (  # noqa: E402
    flow_kl,
    flow_kl_backward,
    flow_logprob,
    flow_logprob_backward,
    flow_step,
    flow_step_backward,
)
from .norm import (  # noqa: E402
    adaln_modulate,
    adaln_modulate_backward,
    gated_detail_residual,
    gated_detail_residual_backward,
    gated_residual,
    gated_residual_backward,
)
from .attention import span_attention_bwd, span_attention_fwd  # noqa: E402
from .tokens import (  # noqa: E402
    compress_tokens,
    compress_tokens_backward,
    expand_tokens,
    expand_tokens_backward,
    pack_latents,
    pack_latents_backward,
    unpack_latents,
    unpack_latents_backward,
)
from .lm_head import (  # noqa: E402
    linear_cross_entropy,
    linear_cross_entropy_backward,
    linear_logprob,
    linear_logprob_backward,
)
