"""Reference (plain PyTorch, float64-capable, autograd) for the tokenizer-compression op family.

Conventions shared by every backend of these ops (docs live in umm_ops/ops/tokens.py):

* Token grids are row-major: token ``r * W + c`` of an image sits at row r, column c of its (H, W) grid.
  ``grid_hw`` is always the FINE grid (H, W): the input grid of ``compress_tokens``, the output grid of
  ``expand_tokens``, the latent grid of ``pack_latents`` / ``unpack_latents``.
* ViT-feature space-to-depth (compress / expand): coarse token (i, j) of the (H/f, W/f) grid holds the f*f fine
  tokens (f*i + di, f*j + dj) concatenated in row-major (di, dj) order, each with its C channels:
  unfolded channel ``(di * f + dj) * C + c``.
* Latent packing (pack / unpack, FLUX.2's patchify): channel-major, unfolded channel ``c * f * f + di * f + dj``,
  then a non-affine BatchNorm with running statistics over the C*f*f packed channels:
  ``(packed - running_mean) / sqrt(running_var + eps)``.  Packed latents come out as tokens
  ``(B, (H/f) * (W/f), C*f*f)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "space_to_depth", "depth_to_space", "compress_tokens", "expand_tokens", "pack_latents", "unpack_latents",
    "ACTIVATIONS",
]

ACTIVATIONS = ("gelu", "gelu_tanh", "none")


def space_to_depth(x: torch.Tensor, grid_hw, factor: int = 2) -> torch.Tensor:
    """(N, H*W, C) row-major tokens -> (N, (H/f)*(W/f), f*f*C), unfolded channel (di*f + dj)*C + c."""
    n, _, c = x.shape
    h, w = grid_hw
    f = factor
    x = x.reshape(n, h // f, f, w // f, f, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // f) * (w // f), f * f * c)


def depth_to_space(y: torch.Tensor, grid_hw, factor: int = 2) -> torch.Tensor:
    """Inverse of space_to_depth: (N, (H/f)*(W/f), f*f*C) -> (N, H*W, C)."""
    n, _, cf = y.shape
    h, w = grid_hw
    f = factor
    c = cf // (f * f)
    y = y.reshape(n, h // f, w // f, f, f, c).permute(0, 1, 3, 2, 4, 5)
    return y.reshape(n, h * w, c)


def _activation(y: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if activation == "none":
        return y
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


def compress_tokens(x, grid_hw, ln_weight, ln_bias, weight, bias, factor: int = 2, activation: str = "gelu",
                    eps: float = 1e-6):
    """activation(Linear(space_to_depth(LayerNorm(x)))): (N, H*W, C) -> (N, (H/f)*(W/f), C_out).

    ln_weight / ln_bias: (C,) or None; weight: (C_out, f*f*C) (nn.Linear layout); bias: (C_out,) or None.
    Computed in float32 for reduced-precision inputs, rounded once at the end.
    """
    dt = x.dtype
    acc = torch.float32 if dt in (torch.float16, torch.bfloat16) else dt
    xn = F.layer_norm(x.to(acc), (x.shape[-1],), None if ln_weight is None else ln_weight.to(acc),
                      None if ln_bias is None else ln_bias.to(acc), eps)
    a = space_to_depth(xn, grid_hw, factor)
    y = F.linear(a, weight.to(acc), None if bias is None else bias.to(acc))
    return _activation(y, activation).to(dt)


def expand_tokens(y, grid_hw, weight, bias, factor: int = 2):
    """depth_to_space(Linear(y)): (N, (H/f)*(W/f), C_in) -> (N, H*W, C); weight (f*f*C, C_in), bias (f*f*C,)."""
    dt = y.dtype
    acc = torch.float32 if dt in (torch.float16, torch.bfloat16) else dt
    z = F.linear(y.to(acc), weight.to(acc), None if bias is None else bias.to(acc))
    return depth_to_space(z, grid_hw, factor).to(dt)


def _patchify(z: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/f)*(W/f), C*f*f), channel c*f*f + di*f + dj."""
    b, c, h, w = z.shape
    f = factor
    z = z.reshape(b, c, h // f, f, w // f, f).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // f) * (w // f), c * f * f)


def _unpatchify(t: torch.Tensor, grid_hw, factor: int) -> torch.Tensor:
    b, _, cf = t.shape
    h, w = grid_hw
    f = factor
    c = cf // (f * f)
    t = t.reshape(b, h // f, w // f, c, f, f).permute(0, 3, 1, 4, 2, 5)
    return t.reshape(b, c, h, w)


def pack_latents(z, running_mean, running_var, factor: int = 2, eps: float = 1e-4):
    """(B, C, H, W) latents -> normalised packed tokens (B, (H/f)*(W/f), C*f*f); stats are (C*f*f,)."""
    dt = z.dtype
    acc = torch.float32 if dt in (torch.float16, torch.bfloat16) else dt
    t = _patchify(z.to(acc), factor)
    return ((t - running_mean.to(acc)) * torch.rsqrt(running_var.to(acc) + eps)).to(dt)


def unpack_latents(tokens, grid_hw, running_mean, running_var, factor: int = 2, eps: float = 1e-4):
    """Exact inverse of pack_latents: (B, (H/f)*(W/f), C*f*f) -> (B, C, H, W) with grid_hw = (H, W)."""
    dt = tokens.dtype
    acc = torch.float32 if dt in (torch.float16, torch.bfloat16) else dt
    t = tokens.to(acc) * torch.sqrt(running_var.to(acc) + eps) + running_mean.to(acc)
    return _unpatchify(t, grid_hw, factor).to(dt)
