"""Plain-PyTorch reference implementations: the numerical oracle of every umm_ops op.

Simple, obviously right, float64-capable, differentiable through torch autograd, never used for speed.
Two layers live here:

* the *public* references (this module): same meaning as the public ops in ``umm_ops``, written the
  way the papers write them (the SDE literally in Flow-GRPO's s = 1 - t convention);
* the *kernel-contract* references (``umm_ops.reference.kernels``): the exact argument/return contract
  every backend (CPU C++, CUDA, Triton) implements, so that the reference is also a backend.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "time_shift",
    "flow_transition",
    "flow_step",
    "flow_logprob",
    "flow_kl",
    "gated_detail_residual",
    "adaln_modulate",
    "gated_residual",
]


def _per_sample(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against a (B, ...) tensor of `ndim` dims."""
    return t.reshape(t.shape[0], *([1] * (ndim - 1)))


def time_shift(t: torch.Tensor, a: float) -> torch.Tensor:
    """Cheers' time shift t' = a t / (1 + (a - 1) t) (t = 1 clean)."""
    return a * t / (1 + (a - 1) * t)


def flow_transition(x, v, t, t_next, sigma):
    """Mean and std of one sampler transition, written in Flow-GRPO's convention.

    Cheers: x_t = t x_data + (1 - t) eps, v = x_data - eps.  Flow-GRPO: s = 1 - t, v_fg = eps - x_data = -v,
      mean = x + [v_fg + sigma^2 / (2 s) (x + (1 - s) v_fg)] ds,  std = sigma sqrt(-ds),  ds = s_next - s.
    sigma = 0 gives the Euler (ODE) step.  t, t_next, sigma: (B,) tensors.
    """
    nd = x.dim()
    s = _per_sample(1 - t, nd).to(x.dtype)
    ds = _per_sample((1 - t_next) - (1 - t), nd).to(x.dtype)
    sig = _per_sample(sigma, nd).to(x.dtype)
    v_fg = -v
    sde = sig != 0
    safe_s = torch.where(sde, s, torch.ones_like(s))
    drift = v_fg + torch.where(sde, sig**2 / (2 * safe_s) * (x + (1 - s) * v_fg), torch.zeros_like(x))
    mean = x + drift * ds
    std = sig * torch.sqrt(torch.clamp(-ds, min=0))
    return mean, std


def _gaussian_logprob_mean(x_next, mean, std):
    """Per-sample mean over elements of log N(x_next; mean, std^2), the direct formula."""
    lp = -((x_next - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


def flow_step(x, v, t, t_next, noise=None, sigma=None, return_logprob=False):
    """One step; Euler when noise is None, SDE otherwise.  t, t_next, sigma: (B,) tensors."""
    if noise is None:
        x_next = x + _per_sample(t_next - t, x.dim()).to(x.dtype) * v
        return (x_next, None) if return_logprob else x_next
    mean, std = flow_transition(x, v, t, t_next, sigma)
    x_next = mean + std * noise
    if not return_logprob:
        return x_next
    return x_next, _gaussian_logprob_mean(x_next, mean, std)


def flow_logprob(x, x_next, v, t, t_next, sigma):
    """Log-prob (mean over elements, per sample) of a given x_next under the transition with velocity v."""
    mean, std = flow_transition(x, v, t, t_next, sigma)
    return _gaussian_logprob_mean(x_next, mean, std)


def flow_kl(v, v_ref, t, t_next, sigma):
    """KL(policy || reference) of two transitions from the same x with the same sigma, mean over elements.

    The means differ only through v: mean_theta - mean_ref = (v - v_ref) * (drift coefficient of v) * ds, so
    x drops out; computed here from two full transitions with x = 0 to stay literal.
    """
    zero = torch.zeros_like(v)
    m1, std = flow_transition(zero, v, t, t_next, sigma)
    m2, _ = flow_transition(zero, v_ref, t, t_next, sigma)
    return (((m1 - m2) ** 2) / (2 * std**2)).flatten(1).mean(1)


def _layer_norm(u, weight, bias, eps):
    mean = u.mean(-1, keepdim=True)
    var = ((u - mean) ** 2).mean(-1, keepdim=True)
    y = (u - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def _rms_norm(u, weight, eps):
    y = u / torch.sqrt((u**2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    return y


def gated_detail_residual(low, high, gate_hidden, w_gate, b_gate, ln_weight, ln_bias, eps=1e-5):
    """LayerNorm(low + g * high), g = gate_hidden @ w_gate + b_gate (one unbounded scalar per token)."""
    g = gate_hidden @ w_gate.reshape(-1, 1) + b_gate.reshape(())
    return _layer_norm(low + g * high, ln_weight, ln_bias, eps)


def adaln_modulate(x, shift, scale, eps=1e-6, norm="rms", weight=None, bias=None):
    """norm(x) * (1 + scale) + shift; x (B, ..., C), shift/scale (B, C) broadcast over the tokens."""
    if norm == "rms":
        n = _rms_norm(x, weight, eps)
        if bias is not None:
            n = n + bias
    elif norm == "layer":
        n = _layer_norm(x, weight, bias, eps)
    else:
        raise ValueError(f"norm must be 'rms' or 'layer', got {norm!r}")
    mid = [1] * (x.dim() - 2)
    B, C = shift.shape
    return n * (1 + scale.reshape(B, *mid, C)) + shift.reshape(B, *mid, C)


def gated_residual(x, gate, y):
    """x + gate * y; gate (B, C) broadcast over the tokens of x, y (B, ..., C)."""
    B, C = gate.shape
    return x + gate.reshape(B, *([1] * (x.dim() - 2)), C) * y
