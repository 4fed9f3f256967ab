"""The kernel contract, executable: what every backend's kernel functions take and return.

Each function here has the exact signature of the C++ op ``torch.ops.umm_ops.kernel_<name>`` and of the
Triton function ``umm_ops.triton.<name>``; the public ops (umm_ops.ops) call whichever backend is selected.
The struct comments in csrc/include/umm/params.h give the formulas.

Shapes: flow ops take (B, N) activations and (B,) float32 t / t_next / sigma; gated_detail_residual takes
(N, C) tokens; adaln_modulate and gated_residual take (B, L, C) tokens and (B, C) modulation (unit column
stride, any row stride).  Masked-out gradients are returned as empty (0,) tensors.  Saved statistics are
float32 (float64 when the activations are float64: the reference alone accepts float64).
"""
from __future__ import annotations

import torch

from . import (
    adaln_modulate as _adaln_modulate,
    flow_kl as _flow_kl,
    flow_logprob as _flow_logprob,
    flow_transition as _flow_transition,
    gated_detail_residual as _gated_detail_residual,
    gated_residual as _gated_residual,
    tokens as _tok,
)
from .lm_head import REDUCTIONS as _REDUCTIONS
from ..backend import _has_values
from ._common import _acc, _autograd_on
from .attention import span_attention_bwd, span_attention_fwd  # noqa: F401  (the contract's span-attention pair)


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _empty(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(0)


def _own(t: torch.Tensor) -> torch.Tensor:
    """A custom op may not return an alias of an input; autograd can hand back views of grad_out (e.g. the
    sum over a size-1 token dim), and .to() of the same dtype is a no-op: always return fresh storage."""
    return t.clone()


def _grads(outputs, inputs, grad_outputs, mask):
    """autograd.grad over the inputs whose mask bit is set; empties elsewhere."""
    wanted = [i for i, m in zip(inputs, mask) if m]
    got = iter(torch.autograd.grad(outputs, wanted, grad_outputs, allow_unused=True) if wanted else [])
    res = []
    for i, m in zip(inputs, mask):
        if m:
            g = next(got)
            res.append(torch.zeros_like(i) if g is None else g)
        else:
            res.append(None)
    return res


def flow_coefficients(t, t_next, sigma):
    """(ax, av, std) of mean = ax x + av v, read off the literal Flow-GRPO transition."""
    one = torch.ones(t.shape[0], 1, dtype=torch.float64, device=t.device)
    zero = torch.zeros_like(one)
    sig = torch.zeros_like(t) if sigma is None else sigma
    t64, tn64, s64 = t.double(), t_next.double(), sig.double()
    ax, std = _flow_transition(one, zero, t64, tn64, s64)
    av, _ = _flow_transition(zero, one, t64, tn64, s64)
    return ax[:, 0], av[:, 0], std[:, 0]


def flow_step(x, v, noise, t, t_next, sigma, want_logprob):
    xc, vc = _acc(x), _acc(v)
    if noise is None:
        dt = (t_next - t).to(xc.dtype)[:, None]
        return (xc + dt * vc).to(x.dtype), _empty(t)
    mean, std = _flow_transition(xc, vc, t, t_next, sigma)
    x_next = (mean + std * _acc(noise)).to(x.dtype)
    if not want_logprob:
        return x_next, _empty(t)
    r = _acc(x_next) - mean
    lp = -(r**2) / (2 * std**2) - torch.log(std) - 0.5 * torch.log(torch.tensor(2 * torch.pi, dtype=std.dtype))
    return x_next, lp.mean(1).to(_stat_dtype(x))


def flow_step_backward(grad, t, t_next, sigma, mask):
    ax, av, std = flow_coefficients(t, t_next, sigma)
    g = _acc(grad)
    out = []
    for coef, m in zip((ax, av, std), mask):
        out.append((g * coef.to(g.dtype)[:, None]).to(grad.dtype) if m else _empty(grad))
    return tuple(out)


def flow_logprob(x, x_next, v, t, t_next, sigma):
    return _flow_logprob(_acc(x), _acc(x_next), _acc(v), t, t_next, sigma).to(_stat_dtype(x))


def flow_logprob_backward(grad, x, x_next, v, t, t_next, sigma, mask):
    with _autograd_on():
        ins = [_acc(a).detach().requires_grad_(True) for a in (x, x_next, v)]
        lp = _flow_logprob(*ins, t, t_next, sigma)
        gs = _grads(lp, ins, grad.to(lp.dtype), mask)
    return tuple(_empty(x) if g is None else _own(g.to(x.dtype)) for g in gs)


def flow_kl(v, v_ref, t, t_next, sigma):
    return _flow_kl(_acc(v), _acc(v_ref), t, t_next, sigma).to(_stat_dtype(v))


def flow_kl_backward(grad, v, v_ref, t, t_next, sigma, mask):
    with _autograd_on():
        ins = [_acc(a).detach().requires_grad_(True) for a in (v, v_ref)]
        kl = _flow_kl(*ins, t, t_next, sigma)
        gs = _grads(kl, ins, grad.to(kl.dtype), mask)
    return tuple(_empty(v) if g is None else _own(g.to(v.dtype)) for g in gs)


def gated_detail_residual(low, high, gate_hidden, w_gate, b_gate, ln_weight, ln_bias, eps):
    lo, hi, gh = _acc(low), _acc(high), _acc(gate_hidden)
    g = gh @ _acc(w_gate).reshape(-1, 1) + _acc(b_gate).reshape(())
    u = lo + g * hi
    mean = u.mean(-1, keepdim=True)
    var = ((u - mean) ** 2).mean(-1, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    out = (u - mean) * rstd * _acc(ln_weight) + _acc(ln_bias)
    sd = _stat_dtype(low)
    return out.to(low.dtype), g[:, 0].to(sd), mean[:, 0].to(sd), rstd[:, 0].to(sd)


def gated_detail_residual_backward(grad, low, high, gate_hidden, w_gate, ln_weight, gate, mean, rstd, eps):
    """Recompute through the reference formula; the saved gate stands in for b_gate (same value)."""
    with _autograd_on():
        lo, hi, gh, w, lw = (_acc(a).detach().requires_grad_(True) for a in (low, high, gate_hidden, w_gate, ln_weight))
        b = lo.new_zeros(1, requires_grad=True)
        lb = torch.zeros_like(lw).requires_grad_(True)  # the bias value does not change any gradient
        g_lin = gh @ w.reshape(-1, 1)
        g = g_lin + b + (gate.to(lo.dtype)[:, None] - g_lin).detach()
        u = lo + g * hi
        mu = u.mean(-1, keepdim=True)
        var = ((u - mu) ** 2).mean(-1, keepdim=True)
        out = (u - mu) / torch.sqrt(var + eps) * lw + lb
        gs = torch.autograd.grad(out, [lo, hi, gh, w, b, lw, lb], _acc(grad))
    return tuple(_own(g.to(low.dtype)) for g in gs)


def adaln_modulate(x, shift, scale, weight, bias, eps, rms):
    xc = _acc(x)
    if rms:
        ms = (xc**2).mean(-1, keepdim=True)
        rstd = torch.rsqrt(ms + eps)
        n = xc * rstd
        mean = _empty(xc)
    else:
        mean = xc.mean(-1, keepdim=True)
        var = ((xc - mean) ** 2).mean(-1, keepdim=True)
        rstd = torch.rsqrt(var + eps)
        n = (xc - mean) * rstd
    if weight is not None:
        n = n * _acc(weight)
    if bias is not None:
        n = n + _acc(bias)
    out = n * (1 + _acc(scale)[:, None, :]) + _acc(shift)[:, None, :]
    sd = _stat_dtype(x)
    mean = mean.reshape(-1).to(sd) if not rms else x.new_empty(0, dtype=sd)
    return out.to(x.dtype), mean, rstd.reshape(-1).to(sd)


def adaln_modulate_backward(grad, x, scale, weight, bias, mean, rstd, eps, rms, mask):
    """Recompute through the reference formula (the saved statistics are not needed here)."""
    with _autograd_on():
        xi = _acc(x).detach().requires_grad_(True)
        sh = torch.zeros(x.shape[0], x.shape[2], dtype=xi.dtype, device=x.device, requires_grad=True)
        sc = _acc(scale).detach().requires_grad_(True)
        w = _acc(weight).detach().requires_grad_(True) if weight is not None else None
        b = _acc(bias).detach().requires_grad_(True) if bias is not None else None
        out = _adaln_modulate(xi, sh, sc, eps=eps, norm="rms" if rms else "layer", weight=w, bias=b)
        ins = [xi, sh, sc, w, b]
        m = [bool(mask[i]) and ins[i] is not None for i in range(5)]
        gs = _grads(out, [i if i is not None else xi for i in ins], _acc(grad), m)
    return tuple(_empty(x) if g is None else _own(g.to(x.dtype)) for g in gs)


def gated_residual(x, gate, y):
    return _gated_residual(_acc(x), _acc(gate), _acc(y)).to(x.dtype)


def gated_residual_backward(grad, gate, y, mask):
    g = _acc(grad)
    dgate = (g * _acc(y)).sum(1).to(gate.dtype) if mask[0] else _empty(grad)
    dy = (g * _acc(gate)[:, None, :]).to(y.dtype) if mask[1] else _empty(grad)
    return dgate, dy


# ------------------------------------------------------------------------------------------ tokens
# Tokenizer compression (umm/tokens.h, conventions in umm_ops/reference/tokens.py).  Grids are passed as the
# FINE grid (H, W) and the factor f; tokens are contiguous.
#   compress_tokens(x (N, H*W, C), ln_weight (C,)?, ln_bias (C,)?, weight (C_out, f*f*C), bias (C_out,)?, H, W, f,
#                   activation, eps, save_pre) -> (out (N, L, C_out), pre, mean (N*H*W,), rstd (N*H*W,))
#     pre: the biased pre-activation (N*L, C_out) in x's dtype when save_pre and activation != "none", else (0,).
#   compress_tokens_backward(grad, x, ln_weight, ln_bias, weight, bias, pre, mean, rstd, H, W, f, activation, eps,
#                            mask[5]) -> (dx, dln_weight, dln_bias, dweight, dbias); pre may be (0,) (recomputed).
#   expand_tokens(y (N, L, C_in), weight (f*f*C, C_in), bias (f*f*C,)?, H, W, f) -> (N, H*W, C)
#   expand_tokens_backward(grad, y, weight, H, W, f, mask[3]) -> (dy, dweight, dbias)
#   pack_latents(z (B, C, H, W), running_mean, running_var (C*f*f,) float32, f, eps) -> (B, L, C*f*f)
#   pack_latents_backward(grad, running_var, H, W, f, eps) -> dz
#   unpack_latents(tokens, running_mean, running_var, H, W, f, eps) -> (B, C, H, W)
#   unpack_latents_backward(grad, running_var, f, eps) -> dtokens


def compress_tokens(x, ln_weight, ln_bias, weight, bias, H, W, factor, activation, eps, save_pre):
    if activation not in _tok.ACTIVATIONS:
        raise ValueError(f"activation: expected one of {_tok.ACTIVATIONS}, got {activation!r}")
    xc = _acc(x)
    mean = xc.mean(-1)
    rstd = torch.rsqrt(((xc - mean[..., None]) ** 2).mean(-1) + eps)
    xn = (xc - mean[..., None]) * rstd[..., None]
    if ln_weight is not None:
        xn = xn * _acc(ln_weight)
    if ln_bias is not None:
        xn = xn + _acc(ln_bias)
    a = _tok.space_to_depth(xn, (H, W), factor)
    pre = a @ _acc(weight).t()
    if bias is not None:
        pre = pre + _acc(bias)
    out = _tok._activation(pre, activation).to(x.dtype)
    keep = save_pre and activation != "none"
    pre_out = pre.reshape(-1, pre.shape[-1]).to(x.dtype) if keep else _empty(x)
    sd = _stat_dtype(x)
    return out, _own(pre_out) if keep else pre_out, mean.reshape(-1).to(sd), rstd.reshape(-1).to(sd)


def _compress_chain(x, ln_weight, ln_bias, weight, bias, H, W, factor, activation, eps):
    """The compress formula on already-upcast tensors (differentiable)."""
    xn = torch.nn.functional.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
    y = _tok.space_to_depth(xn, (H, W), factor) @ weight.t()
    if bias is not None:
        y = y + bias
    return _tok._activation(y, activation)


def compress_tokens_backward(grad, x, ln_weight, ln_bias, weight, bias, pre, mean, rstd, H, W, factor, activation,
                             eps, mask):
    """Recompute through the reference formula (the saved pre-activation and statistics are not needed)."""
    with _autograd_on():
        ins = [None if a is None else _acc(a).detach().requires_grad_(True)
               for a in (x, ln_weight, ln_bias, weight, bias)]
        out = _compress_chain(*ins, H, W, factor, activation, eps)
        m = [bool(mask[i]) and ins[i] is not None for i in range(5)]
        gs = _grads(out, [i if i is not None else ins[0] for i in ins], _acc(grad), m)
    return tuple(_empty(x) if g is None else _own(g.to(x.dtype)) for g in gs)


def expand_tokens(y, weight, bias, H, W, factor):
    return _own(_tok.expand_tokens(y, (H, W), weight, bias, factor))


def expand_tokens_backward(grad, y, weight, H, W, factor, mask):
    g = _tok.space_to_depth(_acc(grad), (H, W), factor)           # (N, L, f*f*C) = dZ
    g2 = g.reshape(-1, g.shape[-1])
    dy = (g @ _acc(weight)).to(y.dtype) if mask[0] else _empty(y)
    dw = (g2.t() @ _acc(y).reshape(-1, y.shape[-1])).to(y.dtype) if mask[1] else _empty(y)
    db = g2.sum(0).to(y.dtype) if mask[2] else _empty(y)
    return dy, dw, db


def pack_latents(z, running_mean, running_var, factor, eps):
    return _own(_tok.pack_latents(z, running_mean, running_var, factor, eps))


def pack_latents_backward(grad, running_var, H, W, factor, eps):
    g = _acc(grad) * torch.rsqrt(running_var.to(_acc(grad).dtype) + eps)
    return _own(_tok._unpatchify(g, (H, W), factor).to(grad.dtype))


def unpack_latents(tokens, running_mean, running_var, H, W, factor, eps):
    return _own(_tok.unpack_latents(tokens, (H, W), running_mean, running_var, factor, eps))


def unpack_latents_backward(grad, running_var, factor, eps):
    g = _tok._patchify(_acc(grad), factor)
    return _own((g * torch.sqrt(running_var.to(g.dtype) + eps)).to(grad.dtype))


# ------------------------------------------------------------------------------------------ LM head
# The LM head with its loss (issue 19; formulas: umm/lm_head.h, conventions: umm_ops/reference/lm_head.py).
# hidden (N, D), weight (V, D), bias (V,) or None, targets (N,) int64, all contiguous; softcap 0.0 = none;
# chunk_rows: rows of logits per chunk for the kernels that chunk (0 = their own choice; ignored here).
# Losses, log-probs, entropies and lse are float32 (float64 for float64 inputs); gradients have hidden's dtype.
#   linear_cross_entropy(hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss, softcap, reduction,
#                        grad_mask[3], chunk_rows) -> (loss, lse (N,), dhidden, dweight, dbias)
#     loss: (N,) for reduction "none", a 0-dim tensor for "sum" / "mean".  With reduction "sum" / "mean" the
#     gradients of that loss w.r.t. the inputs whose grad_mask bit is set come out of the same pass (the backward
#     scales them by the upstream scalar); every other gradient is an empty (0,) tensor.
#   linear_cross_entropy_backward(grad (N,) float32, hidden, weight, bias, targets, lse, ignore_index,
#                                 label_smoothing, z_loss, softcap, mask[3], chunk_rows) -> (dhidden, dweight, dbias)
#     (reduction "none": the per-row gradient is arbitrary, the logits are recomputed chunk by chunk)
#   linear_logprob(hidden, weight, targets, temperature, want_entropy, chunk_rows)
#       -> (logprob (N,), entropy (N,) or (0,), lse (N,))
#   linear_logprob_backward(grad_logprob (N,), grad_entropy (N,) or (0,), hidden, weight, targets, lse, entropy,
#                           temperature, mask[2], chunk_rows) -> (dhidden, dweight)


def _lce_rows(h, w, b, targets, ignore_index, label_smoothing, z_loss, softcap):
    """Per-row losses and lse from upcast tensors (differentiable)."""
    z = h @ w.t()
    if b is not None:
        z = z + b
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, -1)
    valid = targets != ignore_index
    zt = z.gather(1, torch.where(valid, targets, torch.zeros_like(targets))[:, None])[:, 0]
    loss = lse - (1 - label_smoothing) * zt - label_smoothing * z.mean(-1) + z_loss * lse * lse
    return torch.where(valid, loss, torch.zeros_like(loss)), lse, valid


def _reduce(loss, valid, reduction):
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / valid.sum()
    raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")


def _check_targets(targets, V, ignore_index=None):
    ok = (targets >= 0) & (targets < V)
    if ignore_index is not None:
        ok |= targets == ignore_index
    if targets.numel() and _has_values(targets) and not bool(ok.all()):
        i = int((~ok).nonzero()[0, 0])
        raise ValueError(f"targets must lie in [0, {V})" + ("" if ignore_index is None else
                         f" or equal ignore_index {ignore_index}") + f", got targets[{i}] = {int(targets[i])}")


def linear_cross_entropy(hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss, softcap, reduction,
                         grad_mask, chunk_rows):
    _check_targets(targets, weight.shape[0], ignore_index)
    sd = _stat_dtype(hidden)
    want = [bool(grad_mask[0]), bool(grad_mask[1]), bool(grad_mask[2]) and bias is not None]
    fused = reduction != "none" and any(want)
    with _autograd_on() if fused else torch.no_grad():
        ins = [None if a is None else _acc(a).detach().requires_grad_(fused) for a in (hidden, weight, bias)]
        rows, lse, valid = _lce_rows(*ins, targets, ignore_index, label_smoothing, z_loss, softcap)
        loss = _reduce(rows, valid, reduction)
        gs = [None] * 3
        if fused:
            gs = _grads(loss, [i if i is not None else ins[0] for i in ins], None, want)
    grads = tuple(_empty(hidden) if g is None else _own(g.to(hidden.dtype)) for g in gs)
    return (loss.detach().to(sd), lse.detach().to(sd)) + grads


def linear_cross_entropy_backward(grad, hidden, weight, bias, targets, lse, ignore_index, label_smoothing, z_loss,
                                  softcap, mask, chunk_rows):
    with _autograd_on():
        ins = [None if a is None else _acc(a).detach().requires_grad_(True) for a in (hidden, weight, bias)]
        rows, _, _ = _lce_rows(*ins, targets, ignore_index, label_smoothing, z_loss, softcap)
        m = [bool(mask[0]), bool(mask[1]), bool(mask[2]) and bias is not None]
        gs = _grads(rows, [i if i is not None else ins[0] for i in ins], grad.to(rows.dtype), m)
    return tuple(_empty(hidden) if g is None else _own(g.to(hidden.dtype)) for g in gs)


def _logprob_rows(h, w, targets, temperature, want_entropy):
    z = (h @ w.t()) / temperature
    lse = torch.logsumexp(z, -1)
    lp = z.gather(1, targets[:, None])[:, 0] - lse
    ent = lse - (torch.softmax(z, -1) * z).sum(-1) if want_entropy else None
    return lp, ent, lse


def linear_logprob(hidden, weight, targets, temperature, want_entropy, chunk_rows):
    _check_targets(targets, weight.shape[0])
    sd = _stat_dtype(hidden)
    lp, ent, lse = _logprob_rows(_acc(hidden), _acc(weight), targets, temperature, want_entropy)
    return lp.to(sd), (ent.to(sd) if want_entropy else hidden.new_empty(0, dtype=sd)), lse.to(sd)


def linear_logprob_backward(grad_logprob, grad_entropy, hidden, weight, targets, lse, entropy, temperature, mask,
                            chunk_rows):
    want_ent = grad_entropy.numel() > 0
    with _autograd_on():
        ins = [_acc(a).detach().requires_grad_(True) for a in (hidden, weight)]
        lp, ent, _ = _logprob_rows(*ins, targets, temperature, want_ent)
        total = (lp * grad_logprob.to(lp.dtype)).sum()
        if want_ent:
            total = total + (ent * grad_entropy.to(ent.dtype)).sum()
        gs = _grads(total, ins, None, [bool(m) for m in mask])
    return tuple(_empty(hidden) if g is None else _own(g.to(hidden.dtype)) for g in gs)


# The kernel contract: every backend implements (a subset of) exactly these names.
KERNELS = (
    "flow_step", "flow_step_backward", "flow_logprob", "flow_logprob_backward", "flow_kl", "flow_kl_backward",
    "gated_detail_residual", "gated_detail_residual_backward", "adaln_modulate", "adaln_modulate_backward",
    "gated_residual", "gated_residual_backward", "span_attention_fwd", "span_attention_bwd",
    "compress_tokens", "compress_tokens_backward", "expand_tokens", "expand_tokens_backward",
    "pack_latents", "pack_latents_backward", "unpack_latents", "unpack_latents_backward",
    "linear_cross_entropy", "linear_cross_entropy_backward", "linear_logprob", "linear_logprob_backward",
)
