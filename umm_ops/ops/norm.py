"""Normalisation fusions of the Cheers head: the gated detail residual (HiGate) and the adaLN-Zero pieces.

* ``gated_detail_residual``: LayerNorm(low + g * high), g = gate_hidden @ w_gate + b_gate, one unbounded
  scalar per token (Cheers' HiGate: gate_hidden = SiLU(Linear(low)), the final Linear(D -> 1) is fused here).
* ``adaln_modulate``: norm(x) * (1 + scale) + shift, norm = RMSNorm or LayerNorm (optional affine), with
  per-sample modulation broadcast over the tokens; computed in float32 whatever the input dtype.
* ``gated_residual``: x + gate * y, the adaLN-Zero residual.

Tokens: any leading shape; they are flattened (and made contiguous: one copy for non-contiguous inputs).
Modulation tensors (B, C) or (B, 1, C) may be non-contiguous along the batch (chunks of one (B, k*C)
tensor are used without a copy) but need unit stride along C.  All floating inputs of one call share a dtype.
"""
from __future__ import annotations

import math

import torch

from ._common import (autocast_policy, 
    ALL_DTYPES,
    backward_op,
    backward_scope,
    check_eps,
    check_like,
    check_tensor,
    dispatch,
    kernels,
    register_autograd,
    register_fake_both,
    remember_backend,
    unit_last_stride,
)

__all__ = ["gated_detail_residual", "adaln_modulate", "gated_residual"]

_S_GDR = ("(Tensor low, Tensor high, Tensor gate_hidden, Tensor w_gate, Tensor b_gate, Tensor ln_weight, "
          "Tensor ln_bias, float eps) -> (Tensor, Tensor, Tensor, Tensor)")
_S_GDR_BWD = ("(Tensor grad, Tensor low, Tensor high, Tensor gate_hidden, Tensor w_gate, Tensor ln_weight, "
              "Tensor gate, Tensor mean, Tensor rstd, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
_S_ADA = ("(Tensor x, Tensor shift, Tensor scale, Tensor? weight, Tensor? bias, float eps, bool rms) "
          "-> (Tensor, Tensor, Tensor)")
_S_ADA_BWD = ("(Tensor grad, Tensor x, Tensor scale, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, "
              "float eps, bool rms, bool[5] mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
_S_GR = "(Tensor x, Tensor gate, Tensor y) -> Tensor"
_S_GR_BWD = "(Tensor grad, Tensor gate, Tensor y, bool[2] mask) -> (Tensor, Tensor)"


def _gdr_impl(low, high, gate_hidden, w_gate, b_gate, ln_weight, ln_bias, eps):
    k = kernels(low, "gated_detail_residual")
    return k.gated_detail_residual(low, high, gate_hidden, w_gate, b_gate, ln_weight, ln_bias, eps)


def _gdr_bwd_impl(grad, low, high, gate_hidden, w_gate, ln_weight, gate, mean, rstd, eps):
    k = kernels(low, "gated_detail_residual_backward")
    return k.gated_detail_residual_backward(grad, low, high, gate_hidden, w_gate, ln_weight, gate, mean, rstd, eps)


def _ada_impl(x, shift, scale, weight, bias, eps, rms):
    return kernels(x, "adaln_modulate").adaln_modulate(x, shift, scale, weight, bias, eps, rms)


def _ada_bwd_impl(grad, x, scale, weight, bias, mean, rstd, eps, rms, mask):
    k = kernels(x, "adaln_modulate_backward")
    return k.adaln_modulate_backward(grad, x, scale, weight, bias, mean, rstd, eps, rms, list(mask))


def _gr_impl(x, gate, y):
    return kernels(x, "gated_residual").gated_residual(x, gate, y)


def _gr_bwd_impl(grad, gate, y, mask):
    return kernels(y, "gated_residual_backward").gated_residual_backward(grad, gate, y, list(mask))


_gdr_op = torch.library.custom_op("umm_ops::gated_detail_residual", _gdr_impl, mutates_args=(), schema=_S_GDR)
_gdr_bwd_op = torch.library.custom_op("umm_ops::gated_detail_residual_backward", _gdr_bwd_impl, mutates_args=(),
                                      schema=_S_GDR_BWD)
_ada_op = torch.library.custom_op("umm_ops::adaln_modulate", _ada_impl, mutates_args=(), schema=_S_ADA)
_ada_bwd_op = torch.library.custom_op("umm_ops::adaln_modulate_backward", _ada_bwd_impl, mutates_args=(),
                                      schema=_S_ADA_BWD)
_gr_op = torch.library.custom_op("umm_ops::gated_residual", _gr_impl, mutates_args=(), schema=_S_GR)
_gr_bwd_op = torch.library.custom_op("umm_ops::gated_residual_backward", _gr_bwd_impl, mutates_args=(),
                                     schema=_S_GR_BWD)


def _sd(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fake_gdr(low, high, gate_hidden, w_gate, b_gate, ln_weight, ln_bias, eps):
    N = low.shape[0]
    return (torch.empty_like(low), *(low.new_empty((N,), dtype=_sd(low)) for _ in range(3)))


def _fake_gdr_bwd(grad, low, high, gate_hidden, w_gate, ln_weight, gate, mean, rstd, eps):
    return (torch.empty_like(low), torch.empty_like(high), torch.empty_like(gate_hidden), torch.empty_like(w_gate),
            w_gate.new_empty((1,)), torch.empty_like(ln_weight), torch.empty_like(ln_weight))


def _fake_ada(x, shift, scale, weight, bias, eps, rms):
    B, L, _ = x.shape
    mean = x.new_empty((0 if rms else B * L,), dtype=_sd(x))
    return torch.empty_like(x), mean, x.new_empty((B * L,), dtype=_sd(x))


def _fake_ada_bwd(grad, x, scale, weight, bias, mean, rstd, eps, rms, mask):
    B, L, C = x.shape
    e = x.new_empty(0)
    return (
        torch.empty_like(x) if mask[0] else e,
        x.new_empty((B, C)) if mask[1] else x.new_empty(0),
        x.new_empty((B, C)) if mask[2] else x.new_empty(0),
        x.new_empty((C,)) if (mask[3] and weight is not None) else x.new_empty(0),
        x.new_empty((C,)) if (mask[4] and bias is not None) else x.new_empty(0),
    )


def _fake_gr(x, gate, y):
    return torch.empty_like(x)


def _fake_gr_bwd(grad, gate, y, mask):
    B, _, C = y.shape
    return (y.new_empty((B, C)) if mask[0] else y.new_empty(0), torch.empty_like(y) if mask[1] else y.new_empty(0))


register_fake_both("gated_detail_residual", _fake_gdr)
register_fake_both("gated_detail_residual_backward", _fake_gdr_bwd)
register_fake_both("adaln_modulate", _fake_ada)
register_fake_both("adaln_modulate_backward", _fake_ada_bwd)
register_fake_both("gated_residual", _fake_gr)
register_fake_both("gated_residual_backward", _fake_gr_bwd)


def _gdr_setup(ctx, inputs, output):
    remember_backend(ctx)
    low, high, gate_hidden, w_gate, b_gate, ln_weight, ln_bias, eps = inputs
    _, gate, mean, rstd = output
    ctx.eps = eps
    ctx.save_for_backward(low, high, gate_hidden, w_gate, ln_weight, gate, mean, rstd)
    ctx.mark_non_differentiable(gate, mean, rstd)


def _gdr_backward(ctx, grad, *_stats):
    low, high, gate_hidden, w_gate, ln_weight, gate, mean, rstd = ctx.saved_tensors
    if grad is None:
        return (None,) * 8
    with backward_scope(ctx):
        g = backward_op(ctx, _gdr_bwd_op, _gdr_bwd_impl)(grad.contiguous(), low, high, gate_hidden, w_gate,
                                                         ln_weight, gate, mean, rstd, ctx.eps)
    return tuple(gi if need else None for gi, need in zip(g, ctx.needs_input_grad[:7])) + (None,)


def _ada_setup(ctx, inputs, output):
    remember_backend(ctx)
    x, shift, scale, weight, bias, eps, rms = inputs
    _, mean, rstd = output
    ctx.eps, ctx.rms = eps, rms
    ctx.has_w, ctx.has_b = weight is not None, bias is not None
    ctx.save_for_backward(x, scale, weight, bias, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _ada_backward(ctx, grad, *_stats):
    x, scale, weight, bias, mean, rstd = ctx.saved_tensors
    nig = ctx.needs_input_grad
    mask = [bool(nig[0]), bool(nig[1]), bool(nig[2]), bool(nig[3]) and ctx.has_w, bool(nig[4]) and ctx.has_b]
    if grad is None or not any(mask):
        return (None,) * 7
    with backward_scope(ctx):
        g = backward_op(ctx, _ada_bwd_op, _ada_bwd_impl)(grad.contiguous(), x, scale, weight, bias, mean, rstd,
                                                         ctx.eps, ctx.rms, mask)
    return tuple(gi if m else None for gi, m in zip(g, mask)) + (None, None)


def _gr_setup(ctx, inputs, output):
    remember_backend(ctx)
    x, gate, y = inputs
    ctx.save_for_backward(gate, y)


def _gr_backward(ctx, grad):
    gate, y = ctx.saved_tensors
    nig = ctx.needs_input_grad
    mask = [bool(nig[1]), bool(nig[2])]
    dgate = dy = None
    if grad is not None and any(mask):
        with backward_scope(ctx):
            dgate, dy = backward_op(ctx, _gr_bwd_op, _gr_bwd_impl)(grad.contiguous(), gate, y, mask)
    return (grad if nig[0] else None, dgate if mask[0] else None, dy if mask[1] else None)


_gdr_eager = register_autograd(_gdr_op, "GatedDetailResidual", _gdr_impl, _gdr_setup, _gdr_backward)
_ada_eager = register_autograd(_ada_op, "AdaLNModulate", _ada_impl, _ada_setup, _ada_backward)
_gr_eager = register_autograd(_gr_op, "GatedResidual", _gr_impl, _gr_setup, _gr_backward)


# ----------------------------------------------------------------------------------- public API
def _param(p, n: int, ref: torch.Tensor, name: str, default: float | None):
    if p is None:
        return None if default is None else torch.full((n,), default, dtype=ref.dtype, device=ref.device)
    check_like(p, ref, name, "the activations", shape=False)
    if p.numel() != n:
        raise ValueError(f"{name} must have {n} elements, got shape {tuple(p.shape)}")
    return p.reshape(n).contiguous()


@autocast_policy("promote")
def gated_detail_residual(low, high, gate_hidden, w_gate, b_gate=None, ln_weight=None, ln_bias=None,
                          eps: float = 1e-5):
    """LayerNorm(low + g * high) with g = gate_hidden @ w_gate + b_gate, one unbounded scalar per token.

    Args:
        low, high: (..., C) token features (Cheers: upsampled semantic tokens and the ViT patch embedding).
        gate_hidden: (..., Dg), same leading dims (Cheers: SiLU(Linear(low)), Dg = C).
        w_gate: (Dg,) or (1, Dg) (an nn.Linear(Dg, 1).weight); b_gate: (1,), scalar or None.
        ln_weight, ln_bias: (C,) LayerNorm affine parameters or None; eps: LayerNorm epsilon.
    Returns (..., C) in the input dtype.  Differentiable in every tensor argument.
    """
    check_tensor(low, "low", dtypes=ALL_DTYPES, min_dim=1)
    check_like(high, low, "high", "low")
    check_like(gate_hidden, low, "gate_hidden", "low", shape=False)
    if gate_hidden.shape[:-1] != low.shape[:-1]:
        raise ValueError(f"gate_hidden must have the leading dims of low {tuple(low.shape[:-1])}, "
                         f"got shape {tuple(gate_hidden.shape)}")
    C, Dg = low.shape[-1], gate_hidden.shape[-1]
    w = _param(w_gate, Dg, low, "w_gate", None)
    if w is None:
        raise ValueError(f"w_gate is required: a ({Dg},) or (1, {Dg}) tensor, got None")
    b = _param(b_gate, 1, low, "b_gate", 0.0)
    lw = _param(ln_weight, C, low, "ln_weight", 1.0)
    lb = _param(ln_bias, C, low, "ln_bias", 0.0)
    eps = check_eps(eps)
    out, _, _, _ = dispatch(_gdr_op, _gdr_eager, _gdr_impl, low, low.reshape(-1, C).contiguous(),
                            high.reshape(-1, C).contiguous(), gate_hidden.reshape(-1, Dg).contiguous(), w, b, lw, lb,
                            float(eps))
    return out.reshape(low.shape)


def _modulation(m, B: int, C: int, ref: torch.Tensor, name: str) -> torch.Tensor:
    check_like(m, ref, name, "x", shape=False)
    if m.dim() == 3 and m.shape[1] == 1:
        m = m[:, 0]
    if m.shape != (B, C):
        raise ValueError(f"{name} must be (B, C) = ({B}, {C}) or (B, 1, C), got shape {tuple(m.shape)}")
    return unit_last_stride(m)


@autocast_policy("promote")
def adaln_modulate(x, shift, scale, eps: float = 1e-6, norm: str = "rms", weight=None, bias=None):
    """norm(x) * (1 + scale) + shift with per-sample modulation broadcast over tokens (adaLN-Zero).

    Args:
        x: (B, ..., C) tokens.  shift, scale: (B, C) or (B, 1, C).
        norm: "rms" (RMSNorm) or "layer" (LayerNorm); weight, bias: optional (C,) affine of the norm.
    Returns the shape and dtype of x; the arithmetic is float32.  Differentiable in x, shift, scale,
    weight and bias.
    """
    check_tensor(x, "x", dtypes=ALL_DTYPES, min_dim=2)
    if norm not in ("rms", "layer"):
        raise ValueError(f"norm must be 'rms' or 'layer', got {norm!r}")
    eps = check_eps(eps)
    B, C = x.shape[0], x.shape[-1]
    sh = _modulation(shift, B, C, x, "shift")
    sc = _modulation(scale, B, C, x, "scale")
    w = _param(weight, C, x, "weight", None)
    b = _param(bias, C, x, "bias", None)
    L = math.prod(x.shape[1:-1])  # (not reshape(B, -1, C): ambiguous for an empty batch)
    out, _, _ = dispatch(_ada_op, _ada_eager, _ada_impl, x, x.reshape(B, L, C).contiguous(), sh, sc, w, b,
                         float(eps), norm == "rms")
    return out.reshape(x.shape)


@autocast_policy("promote")
def gated_residual(x, gate, y):
    """x + gate * y with gate (B, C) or (B, 1, C) broadcast over the tokens of x and y (B, ..., C)."""
    check_tensor(x, "x", dtypes=ALL_DTYPES, min_dim=2)
    check_like(y, x, "y", "x")
    B, C = x.shape[0], x.shape[-1]
    g = _modulation(gate, B, C, x, "gate")
    L = math.prod(x.shape[1:-1])  # (not reshape(B, -1, C): ambiguous for an empty batch)
    return dispatch(_gr_op, _gr_eager, _gr_impl, x, x.reshape(B, L, C).contiguous(), g,
                    y.reshape(B, L, C).contiguous()).reshape(x.shape)
