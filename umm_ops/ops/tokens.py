"""Tokenizer compression ops (issue 4): compress_tokens, expand_tokens, pack_latents, unpack_latents.

Cheers turns 32x32 ViT features (1152 channels) into 16x16 LLM tokens with LayerNorm -> 2x2 space-to-depth ->
Linear -> GELU (-> a second, plain Linear that stays outside); its head inverts it (Linear to f*f*C, then
depth-to-space); its VAE latents are packed 2x2 and normalised by a non-affine BatchNorm.  Done eagerly each step
writes the whole tensor back to memory; here each op is one custom op with a fused kernel per backend:

* CPU (C++): LayerNorm + space-to-depth in one pass into the GEMM's A operand, at::mm, bias + activation in one
  pass; the backward recomputes A from the saved statistics (as cheap as reading a saved A, and A is never kept
  alive between forward and backward) and fuses the LayerNorm backward with the depth-to-space scatter.
* Triton: a gather-GEMM (A tiles loaded with space-to-depth addressing and normalised on the fly from per-token
  mean / rstd of a small pre-pass, bias + activation epilogue), expand with the scatter in the GEMM epilogue.
* CUDA: the same gather-GEMM on tensor cores (CuTe, sm80+, bf16 / fp16) for the forward; cuBLAS plus fused
  passes for the backward.

Conventions (umm_ops/reference/tokens.py): row-major token grids; ``grid_hw`` is always the FINE grid (H, W);
coarse token (i, j) holds fine tokens (f i + di, f j + dj) in row-major (di, dj) order, unfolded channel
``(di f + dj) C + c``; latent packing is channel-major ``c f f + di f + dj`` (FLUX.2's patchify).  Arithmetic is
float32 (the GEMM operands stay in the input dtype with float32 accumulation, as in eager PyTorch); float64 runs on
the reference backend.  Running statistics of pack / unpack are buffers: they get no gradient.
"""
from __future__ import annotations

import operator

import torch

from ..backend import value_checks_enabled

from ..reference.tokens import ACTIVATIONS
from ._common import (autocast_policy, 
    ALL_DTYPES,
    backward_op,
    backward_scope,
    check_eps,
    check_like,
    check_tensor,
    dispatch,
    kernels,
    needs_grad,
    register_autograd,
    register_fake_both,
    remember_backend,
)

__all__ = ["compress_tokens", "expand_tokens", "pack_latents", "unpack_latents"]

_S_CT = ("(Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor weight, Tensor? bias, int H, int W, int factor, "
         "str activation, float eps, bool save_pre) -> (Tensor, Tensor, Tensor, Tensor)")
_S_CT_BWD = ("(Tensor grad, Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor weight, Tensor? bias, Tensor pre, "
             "Tensor mean, Tensor rstd, int H, int W, int factor, str activation, float eps, bool[5] mask) "
             "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")
_S_ET = "(Tensor y, Tensor weight, Tensor? bias, int H, int W, int factor) -> Tensor"
_S_ET_BWD = ("(Tensor grad, Tensor y, Tensor weight, int H, int W, int factor, bool[3] mask) "
             "-> (Tensor, Tensor, Tensor)")
_S_PK = "(Tensor z, Tensor running_mean, Tensor running_var, int factor, float eps) -> Tensor"
_S_PK_BWD = "(Tensor grad, Tensor running_var, int H, int W, int factor, float eps) -> Tensor"
_S_UP = ("(Tensor tokens, Tensor running_mean, Tensor running_var, int H, int W, int factor, float eps) "
         "-> Tensor")
_S_UP_BWD = "(Tensor grad, Tensor running_var, int factor, float eps) -> Tensor"


def _ct_impl(x, ln_weight, ln_bias, weight, bias, H, W, factor, activation, eps, save_pre):
    return kernels(x, "compress_tokens").compress_tokens(x, ln_weight, ln_bias, weight, bias, H, W, factor,
                                                         activation, eps, save_pre)


def _ct_bwd_impl(grad, x, ln_weight, ln_bias, weight, bias, pre, mean, rstd, H, W, factor, activation, eps, mask):
    return kernels(x, "compress_tokens_backward").compress_tokens_backward(
        grad, x, ln_weight, ln_bias, weight, bias, pre, mean, rstd, H, W, factor, activation, eps, list(mask))


def _et_impl(y, weight, bias, H, W, factor):
    return kernels(y, "expand_tokens").expand_tokens(y, weight, bias, H, W, factor)


def _et_bwd_impl(grad, y, weight, H, W, factor, mask):
    return kernels(y, "expand_tokens_backward").expand_tokens_backward(grad, y, weight, H, W, factor, list(mask))


def _pk_impl(z, running_mean, running_var, factor, eps):
    return kernels(z, "pack_latents").pack_latents(z, running_mean, running_var, factor, eps)


def _pk_bwd_impl(grad, running_var, H, W, factor, eps):
    return kernels(grad, "pack_latents_backward").pack_latents_backward(grad, running_var, H, W, factor, eps)


def _up_impl(tokens, running_mean, running_var, H, W, factor, eps):
    return kernels(tokens, "unpack_latents").unpack_latents(tokens, running_mean, running_var, H, W, factor, eps)


def _up_bwd_impl(grad, running_var, factor, eps):
    return kernels(grad, "unpack_latents_backward").unpack_latents_backward(grad, running_var, factor, eps)


_ct_op = torch.library.custom_op("umm_ops::compress_tokens", _ct_impl, mutates_args=(), schema=_S_CT)
_ct_bwd_op = torch.library.custom_op("umm_ops::compress_tokens_backward", _ct_bwd_impl, mutates_args=(),
                                     schema=_S_CT_BWD)
_et_op = torch.library.custom_op("umm_ops::expand_tokens", _et_impl, mutates_args=(), schema=_S_ET)
_et_bwd_op = torch.library.custom_op("umm_ops::expand_tokens_backward", _et_bwd_impl, mutates_args=(),
                                     schema=_S_ET_BWD)
_pk_op = torch.library.custom_op("umm_ops::pack_latents", _pk_impl, mutates_args=(), schema=_S_PK)
_pk_bwd_op = torch.library.custom_op("umm_ops::pack_latents_backward", _pk_bwd_impl, mutates_args=(),
                                     schema=_S_PK_BWD)
_up_op = torch.library.custom_op("umm_ops::unpack_latents", _up_impl, mutates_args=(), schema=_S_UP)
_up_bwd_op = torch.library.custom_op("umm_ops::unpack_latents_backward", _up_bwd_impl, mutates_args=(),
                                     schema=_S_UP_BWD)


# ----------------------------------------------------------------------------------- fake kernels
def _sd(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fake_ct(x, ln_weight, ln_bias, weight, bias, H, W, factor, activation, eps, save_pre):
    N = x.shape[0]
    L = (H // factor) * (W // factor)
    Co = weight.shape[0]
    keep = save_pre and activation != "none"
    pre = x.new_empty((N * L, Co)) if keep else x.new_empty((0,))
    T = x.shape[0] * x.shape[1]
    return x.new_empty((N, L, Co)), pre, x.new_empty((T,), dtype=_sd(x)), x.new_empty((T,), dtype=_sd(x))


def _fake_ct_bwd(grad, x, ln_weight, ln_bias, weight, bias, pre, mean, rstd, H, W, factor, activation, eps, mask):
    e = x.new_empty((0,))
    return (torch.empty_like(x) if mask[0] else e,
            torch.empty_like(ln_weight) if (mask[1] and ln_weight is not None) else x.new_empty((0,)),
            torch.empty_like(ln_bias) if (mask[2] and ln_bias is not None) else x.new_empty((0,)),
            torch.empty_like(weight) if mask[3] else x.new_empty((0,)),
            torch.empty_like(bias) if (mask[4] and bias is not None) else x.new_empty((0,)))


def _fake_et(y, weight, bias, H, W, factor):
    return y.new_empty((y.shape[0], H * W, weight.shape[0] // (factor * factor)))


def _fake_et_bwd(grad, y, weight, H, W, factor, mask):
    return (torch.empty_like(y) if mask[0] else y.new_empty((0,)),
            torch.empty_like(weight) if mask[1] else y.new_empty((0,)),
            y.new_empty((weight.shape[0],)) if mask[2] else y.new_empty((0,)))


def _fake_pk(z, running_mean, running_var, factor, eps):
    B, C, H, W = z.shape
    return z.new_empty((B, (H // factor) * (W // factor), C * factor * factor))


def _fake_pk_bwd(grad, running_var, H, W, factor, eps):
    return grad.new_empty((grad.shape[0], grad.shape[2] // (factor * factor), H, W))


def _fake_up(tokens, running_mean, running_var, H, W, factor, eps):
    return tokens.new_empty((tokens.shape[0], tokens.shape[2] // (factor * factor), H, W))


def _fake_up_bwd(grad, running_var, factor, eps):
    return _fake_pk(grad, None, None, factor, eps)


register_fake_both("compress_tokens", _fake_ct)
register_fake_both("compress_tokens_backward", _fake_ct_bwd)
register_fake_both("expand_tokens", _fake_et)
register_fake_both("expand_tokens_backward", _fake_et_bwd)
register_fake_both("pack_latents", _fake_pk)
register_fake_both("pack_latents_backward", _fake_pk_bwd)
register_fake_both("unpack_latents", _fake_up)
register_fake_both("unpack_latents_backward", _fake_up_bwd)


# ----------------------------------------------------------------------------------- autograd
def _ct_setup(ctx, inputs, output):
    remember_backend(ctx)
    ctx.set_materialize_grads(False)  # pre / mean / rstd get no gradient: no zero tensors for them
    x, ln_weight, ln_bias, weight, bias, H, W, factor, activation, eps, _save = inputs
    _, pre, mean, rstd = output
    ctx.geom = (H, W, factor, activation, eps)
    ctx.save_for_backward(x, ln_weight, ln_bias, weight, bias, pre, mean, rstd)
    ctx.mark_non_differentiable(pre, mean, rstd)


def _ct_backward(ctx, grad, *_rest):
    x, ln_weight, ln_bias, weight, bias, pre, mean, rstd = ctx.saved_tensors
    nig = ctx.needs_input_grad
    mask = [bool(nig[0]), bool(nig[1]) and ln_weight is not None, bool(nig[2]) and ln_bias is not None,
            bool(nig[3]), bool(nig[4]) and bias is not None]
    if grad is None or not any(mask):
        return (None,) * 11
    H, W, factor, activation, eps = ctx.geom
    with backward_scope(ctx):
        g = backward_op(ctx, _ct_bwd_op, _ct_bwd_impl)(grad.contiguous(), x, ln_weight, ln_bias, weight, bias, pre,
                                                       mean, rstd, H, W, factor, activation, eps, mask)
    return tuple(gi if m else None for gi, m in zip(g, mask)) + (None,) * 6


def _et_setup(ctx, inputs, output):
    remember_backend(ctx)
    y, weight, bias, H, W, factor = inputs
    ctx.geom = (H, W, factor)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(y, weight)


def _et_backward(ctx, grad):
    y, weight = ctx.saved_tensors
    nig = ctx.needs_input_grad
    mask = [bool(nig[0]), bool(nig[1]), bool(nig[2]) and ctx.has_bias]
    if grad is None or not any(mask):
        return (None,) * 6
    with backward_scope(ctx):
        g = backward_op(ctx, _et_bwd_op, _et_bwd_impl)(grad.contiguous(), y, weight, *ctx.geom, mask)
    return tuple(gi if m else None for gi, m in zip(g, mask)) + (None,) * 3


def _pk_setup(ctx, inputs, output):
    remember_backend(ctx)
    z, _running_mean, running_var, factor, eps = inputs
    ctx.geom = (z.shape[2], z.shape[3], factor, eps)
    ctx.save_for_backward(running_var)


def _pk_backward(ctx, grad):
    (running_var,) = ctx.saved_tensors
    if grad is None or not ctx.needs_input_grad[0]:
        return (None,) * 5
    with backward_scope(ctx):
        dz = backward_op(ctx, _pk_bwd_op, _pk_bwd_impl)(grad.contiguous(), running_var, *ctx.geom)
    return dz, None, None, None, None


def _up_setup(ctx, inputs, output):
    remember_backend(ctx)
    _tokens, _running_mean, running_var, _H, _W, factor, eps = inputs
    ctx.geom = (factor, eps)
    ctx.save_for_backward(running_var)


def _up_backward(ctx, grad):
    (running_var,) = ctx.saved_tensors
    if grad is None or not ctx.needs_input_grad[0]:
        return (None,) * 7
    with backward_scope(ctx):
        dt = backward_op(ctx, _up_bwd_op, _up_bwd_impl)(grad.contiguous(), running_var, *ctx.geom)
    return (dt,) + (None,) * 6


_ct_eager = register_autograd(_ct_op, "CompressTokens", _ct_impl, _ct_setup, _ct_backward)
_et_eager = register_autograd(_et_op, "ExpandTokens", _et_impl, _et_setup, _et_backward)
_pk_eager = register_autograd(_pk_op, "PackLatents", _pk_impl, _pk_setup, _pk_backward)
_up_eager = register_autograd(_up_op, "UnpackLatents", _up_impl, _up_setup, _up_backward)


# ----------------------------------------------------------------------------------- public API
def _factor(factor) -> int:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive int, got {factor!r}")
    return factor


def _grid(grid_hw, factor: int, what: str) -> tuple[int, int]:
    try:
        H, W = grid_hw
        if isinstance(H, bool) or isinstance(W, bool):
            raise TypeError
        H, W = operator.index(H), operator.index(W)  # ints (and integer scalars); 4.9 or "4" are refused
    except (TypeError, ValueError):
        raise ValueError(f"grid_hw must be a pair of ints (H, W), got {grid_hw!r}") from None
    if H < 1 or W < 1:
        raise ValueError(f"grid_hw must be positive, got ({H}, {W})")
    if H % factor or W % factor:
        raise ValueError(f"{what} grid (H, W) must be divisible by factor {factor}, got ({H}, {W})")
    return H, W


def _vec(p, n: int, ref: torch.Tensor, name: str, ref_name: str):
    if p is None:
        return None
    check_like(p, ref, name, ref_name, shape=False)
    if p.dim() != 1 or p.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(p.shape)}")
    return p.contiguous()


@autocast_policy("lower")
def compress_tokens(x, grid_hw, ln_weight, ln_bias, weight, bias, factor=2, activation="gelu", eps=1e-6):
    """activation(Linear(space_to_depth(LayerNorm(x)))): (N, H*W, C) -> (N, (H/f)*(W/f), C_out).

    Args:
        x: (N, H*W, C) ViT features on the row-major fine grid ``grid_hw`` = (H, W).
        ln_weight, ln_bias: (C,) LayerNorm affine or None.  weight: (C_out, f*f*C) (nn.Linear layout), unfolded
            channel ``(di*f + dj)*C + c``; bias: (C_out,) or None.
        factor: f (H and W must be divisible by it); activation: "gelu" (erf), "gelu_tanh" or "none";
        eps: LayerNorm epsilon.
    Returns (N, (H/f)*(W/f), C_out) in x's dtype.  Differentiable in x, ln_weight, ln_bias, weight, bias.
    """
    check_tensor(x, "x", dtypes=ALL_DTYPES, dim=3)
    f = _factor(factor)
    H, W = _grid(grid_hw, f, "the token")
    N, T, C = x.shape
    if T != H * W:
        raise ValueError(f"x has {T} tokens per image but grid_hw = ({H}, {W}) needs H*W = {H * W}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    eps = check_eps(eps)
    lw = _vec(ln_weight, C, x, "ln_weight", "x")
    lb = _vec(ln_bias, C, x, "ln_bias", "x")
    check_like(weight, x, "weight", "x", shape=False)
    if weight.dim() != 2 or weight.shape[1] != f * f * C:
        raise ValueError(f"weight must be (C_out, f*f*C) = (C_out, {f * f * C}), got shape {tuple(weight.shape)}")
    b = _vec(bias, weight.shape[0], x, "bias", "x")
    grad = needs_grad(x, ln_weight, ln_bias, weight, bias)
    args = (x.contiguous(), lw, lb, weight.contiguous(), b, H, W, f, activation, float(eps), grad)
    return dispatch(_ct_op, _ct_eager, _ct_impl, x, *args, grad=grad)[0]


@autocast_policy("lower")
def expand_tokens(y, grid_hw, weight, bias, factor=2):
    """depth_to_space(Linear(y)): (N, (H/f)*(W/f), C_in) -> (N, H*W, C), the head's inverse of compress.

    Args:
        y: (N, (H/f)*(W/f), C_in) coarse tokens; grid_hw: the FINE output grid (H, W).
        weight: (f*f*C, C_in) (nn.Linear layout), output channel ``(di*f + dj)*C + c``; bias: (f*f*C,) or None.
    Returns (N, H*W, C) in y's dtype.  Differentiable in y, weight, bias.
    """
    check_tensor(y, "y", dtypes=ALL_DTYPES, dim=3)
    f = _factor(factor)
    H, W = _grid(grid_hw, f, "the output")
    L = (H // f) * (W // f)
    if y.shape[1] != L:
        raise ValueError(f"y has {y.shape[1]} tokens per image but grid_hw = ({H}, {W}) with factor {f} "
                         f"needs (H/f)*(W/f) = {L}")
    check_like(weight, y, "weight", "y", shape=False)
    if weight.dim() != 2 or weight.shape[1] != y.shape[2] or weight.shape[0] % (f * f):
        raise ValueError(f"weight must be (f*f*C, C_in) with C_in = {y.shape[2]} and f*f = {f * f} dividing its "
                         f"rows, got shape {tuple(weight.shape)}")
    b = _vec(bias, weight.shape[0], y, "bias", "y")
    args = (y.contiguous(), weight.contiguous(), b, H, W, f)
    return dispatch(_et_op, _et_eager, _et_impl, y, *args)


def _stats(s, n: int, ref: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(s).__name__}")
    if not s.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {s.dtype}")
    if s.device != ref.device:
        raise ValueError(f"{name} must be on the device of the latents ({ref.device}), got {s.device}")
    if s.numel() != n:
        raise ValueError(f"{name} must have C*f*f = {n} elements, got shape {tuple(s.shape)}")
    # buffers: no gradient; float32 for the kernels (float64 for float64 latents on the reference backend)
    return s.detach().reshape(n).to(_sd(ref)).contiguous()


def _check_var(running_var: torch.Tensor, eps: float) -> None:
    """running_var + eps must be > 0 (else the normalisation divides by zero or takes the root of a negative)."""
    if value_checks_enabled(running_var) and running_var.numel():
        bad = ~(running_var + eps > 0)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"running_var + eps must be > 0 (a variance), got running_var[{i}] = "
                             f"{running_var[i].item()} with eps = {eps}")


@autocast_policy("promote")
def pack_latents(z, running_mean, running_var, factor=2, eps=1e-4):
    """(B, C, H, W) latents -> normalised packed tokens (B, (H/f)*(W/f), C*f*f).

    Packed channel ``c*f*f + di*f + dj`` (FLUX.2's patchify), then ``(packed - running_mean) /
    sqrt(running_var + eps)`` with (C*f*f,) running statistics (a non-affine BatchNorm in eval mode).
    Differentiable in z; the statistics are buffers and get no gradient.
    """
    check_tensor(z, "z", dtypes=ALL_DTYPES, dim=4)
    f = _factor(factor)
    B, C, H, W = z.shape
    _grid((H, W), f, "the latent")
    eps = check_eps(eps)
    n = C * f * f
    var = _stats(running_var, n, z, "running_var")
    _check_var(var, eps)
    args = (z.contiguous(), _stats(running_mean, n, z, "running_mean"), var, f, eps)
    return dispatch(_pk_op, _pk_eager, _pk_impl, z, *args)


@autocast_policy("promote")
def unpack_latents(tokens, grid_hw, running_mean, running_var, factor=2, eps=1e-4):
    """Exact inverse of pack_latents: (B, (H/f)*(W/f), C*f*f) -> (B, C, H, W) with grid_hw = (H, W)."""
    check_tensor(tokens, "tokens", dtypes=ALL_DTYPES, dim=3)
    f = _factor(factor)
    H, W = _grid(grid_hw, f, "the latent")
    L = (H // f) * (W // f)
    if tokens.shape[1] != L or tokens.shape[2] % (f * f):
        raise ValueError(f"tokens must be (B, (H/f)*(W/f), C*f*f) with (H/f)*(W/f) = {L} and f*f = {f * f} dividing "
                         f"the channels, got shape {tuple(tokens.shape)}")
    eps = check_eps(eps)
    n = tokens.shape[2]
    var = _stats(running_var, n, tokens, "running_var")
    _check_var(var, eps)
    args = (tokens.contiguous(), _stats(running_mean, n, tokens, "running_mean"), var, H, W, f, eps)
    return dispatch(_up_op, _up_eager, _up_impl, tokens, *args)
