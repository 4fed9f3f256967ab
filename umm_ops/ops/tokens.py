"""Tokenizer compression ops (issue 4): compress_tokens, expand_tokens, pack_latents, unpack_latents.

PROVISIONAL: these public functions currently run the plain-PyTorch reference (umm_ops.reference.tokens);
the fused custom ops (CPU C++, Triton, CUDA) replace the bodies behind the same signatures.
"""
from __future__ import annotations

from ..reference import tokens as _ref

__all__ = ["compress_tokens", "expand_tokens", "pack_latents", "unpack_latents"]


def compress_tokens(x, grid_hw, ln_weight, ln_bias, weight, bias, factor=2, activation="gelu", eps=1e-6):
    return _ref.compress_tokens(x, grid_hw, ln_weight, ln_bias, weight, bias, factor, activation, eps)


def expand_tokens(y, grid_hw, weight, bias, factor=2):
    return _ref.expand_tokens(y, grid_hw, weight, bias, factor)


def pack_latents(z, running_mean, running_var, factor=2, eps=1e-4):
    return _ref.pack_latents(z, running_mean, running_var, factor, eps)


def unpack_latents(tokens, grid_hw, running_mean, running_var, factor=2, eps=1e-4):
    return _ref.unpack_latents(tokens, grid_hw, running_mean, running_var, factor, eps)
