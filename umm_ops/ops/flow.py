"""Flow-matching sampler transitions: Euler / SDE steps with log-probs, the log-prob of a recorded step, and the
KL between two transitions (the image half of CLEAR's and R3's GRPO).

Convention (Cheers): x_t = t * x_data + (1 - t) * noise, t = 1 is clean, the model predicts v = x_data - noise,
sampling runs t from 0 to 1.  The SDE is Flow-GRPO's (written there in s = 1 - t): with dt = t_next - t > 0,
    k = sigma^2 / (2 (1 - t)),  mean = (1 - k dt) x + dt (1 + k t) v,  std = sigma sqrt(dt),
    x_next = mean + std z,   log p(x_next | x) = mean over elements of log N(x_next; mean, std^2).
sigma is per step: a constant (CLEAR uses 0.3) or Flow-GRPO's schedule sigma_t = a sqrt((1 - t) / t)
(``SigmaSchedule(a)``, a ~ 0.7).

Every op takes latents of any shape (B, ...) with per-sample t (float or (B,) tensor); inputs are reshaped
to (B, N) and made contiguous (one copy for non-contiguous inputs).  Log-probs and KLs are float32 (B,).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..backend import value_checks_enabled
from ._common import (autocast_policy, 
    ALL_DTYPES,
    backward_op,
    backward_scope,
    check_like,
    check_tensor,
    dispatch,
    kernels,
    register_autograd,
    register_fake_both,
    remember_backend,
)

__all__ = ["flow_step", "flow_logprob", "flow_kl", "time_shift", "SigmaSchedule"]

_S_STEP = ("(Tensor x, Tensor v, Tensor? noise, Tensor t, Tensor t_next, Tensor? sigma, bool want_logprob) "
           "-> (Tensor, Tensor)")
_S_STEP_BWD = "(Tensor grad, Tensor t, Tensor t_next, Tensor? sigma, bool[3] mask) -> (Tensor, Tensor, Tensor)"
_S_LP = "(Tensor x, Tensor x_next, Tensor v, Tensor t, Tensor t_next, Tensor sigma) -> Tensor"
_S_LP_BWD = ("(Tensor grad, Tensor x, Tensor x_next, Tensor v, Tensor t, Tensor t_next, Tensor sigma, "
             "bool[3] mask) -> (Tensor, Tensor, Tensor)")
_S_KL = "(Tensor v, Tensor v_ref, Tensor t, Tensor t_next, Tensor sigma) -> Tensor"
_S_KL_BWD = ("(Tensor grad, Tensor v, Tensor v_ref, Tensor t, Tensor t_next, Tensor sigma, bool[2] mask) "
             "-> (Tensor, Tensor)")


# ----------------------------------------------------------------------------------- custom ops
def _step_impl(x, v, noise, t, t_next, sigma, want_logprob):
    return kernels(x, "flow_step").flow_step(x, v, noise, t, t_next, sigma, want_logprob)


def _step_bwd_impl(grad, t, t_next, sigma, mask):
    return kernels(grad, "flow_step_backward").flow_step_backward(grad, t, t_next, sigma, list(mask))


def _lp_impl(x, x_next, v, t, t_next, sigma):
    return kernels(x, "flow_logprob").flow_logprob(x, x_next, v, t, t_next, sigma)


def _lp_bwd_impl(grad, x, x_next, v, t, t_next, sigma, mask):
    k = kernels(x, "flow_logprob_backward")
    return k.flow_logprob_backward(grad, x, x_next, v, t, t_next, sigma, list(mask))


def _kl_impl(v, v_ref, t, t_next, sigma):
    return kernels(v, "flow_kl").flow_kl(v, v_ref, t, t_next, sigma)


def _kl_bwd_impl(grad, v, v_ref, t, t_next, sigma, mask):
    return kernels(v, "flow_kl_backward").flow_kl_backward(grad, v, v_ref, t, t_next, sigma, list(mask))


_step_op = torch.library.custom_op("umm_ops::flow_step", _step_impl, mutates_args=(), schema=_S_STEP)
_step_bwd_op = torch.library.custom_op("umm_ops::flow_step_backward", _step_bwd_impl, mutates_args=(),
                                       schema=_S_STEP_BWD)
_lp_op = torch.library.custom_op("umm_ops::flow_logprob", _lp_impl, mutates_args=(), schema=_S_LP)
_lp_bwd_op = torch.library.custom_op("umm_ops::flow_logprob_backward", _lp_bwd_impl, mutates_args=(),
                                     schema=_S_LP_BWD)
_kl_op = torch.library.custom_op("umm_ops::flow_kl", _kl_impl, mutates_args=(), schema=_S_KL)
_kl_bwd_op = torch.library.custom_op("umm_ops::flow_kl_backward", _kl_bwd_impl, mutates_args=(), schema=_S_KL_BWD)


def _stat_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fake_step(x, v, noise, t, t_next, sigma, want_logprob):
    lp = x.new_empty((x.shape[0] if want_logprob else 0,), dtype=_stat_dtype(x))
    return torch.empty_like(x), lp


def _maybe(m, like):
    return torch.empty_like(like) if m else like.new_empty(0)


def _fake_step_bwd(grad, t, t_next, sigma, mask):
    return tuple(_maybe(m, grad) for m in mask)


def _fake_lp(x, x_next, v, t, t_next, sigma):
    return x.new_empty((x.shape[0],), dtype=_stat_dtype(x))


def _fake_lp_bwd(grad, x, x_next, v, t, t_next, sigma, mask):
    return tuple(_maybe(m, x) for m in mask)


def _fake_kl(v, v_ref, t, t_next, sigma):
    return v.new_empty((v.shape[0],), dtype=_stat_dtype(v))


def _fake_kl_bwd(grad, v, v_ref, t, t_next, sigma, mask):
    return tuple(_maybe(m, v) for m in mask)


register_fake_both("flow_step", _fake_step)
register_fake_both("flow_step_backward", _fake_step_bwd)
register_fake_both("flow_logprob", _fake_lp)
register_fake_both("flow_logprob_backward", _fake_lp_bwd)
register_fake_both("flow_kl", _fake_kl)
register_fake_both("flow_kl_backward", _fake_kl_bwd)


def _step_setup(ctx, inputs, output):
    remember_backend(ctx)
    x, v, noise, t, t_next, sigma, want_logprob = inputs
    ctx.sde = noise is not None
    ctx.save_for_backward(t, t_next, sigma if ctx.sde else None)
    ctx.mark_non_differentiable(output[1])


def _step_backward(ctx, grad_x_next, _grad_logprob):
    t, t_next, sigma = ctx.saved_tensors
    nig = ctx.needs_input_grad
    mask = [bool(nig[0]), bool(nig[1]), bool(nig[2]) and ctx.sde]
    if grad_x_next is None or not any(mask):
        return None, None, None, None, None, None, None
    with backward_scope(ctx):
        dx, dv, dz = backward_op(ctx, _step_bwd_op, _step_bwd_impl)(grad_x_next.contiguous(), t, t_next, sigma, mask)
    return (dx if mask[0] else None, dv if mask[1] else None, dz if mask[2] else None, None, None, None, None)


def _lp_setup(ctx, inputs, output):
    remember_backend(ctx)
    x, x_next, v, t, t_next, sigma = inputs
    ctx.save_for_backward(x, x_next, v, t, t_next, sigma)


def _lp_backward(ctx, grad):
    x, x_next, v, t, t_next, sigma = ctx.saved_tensors
    mask = [bool(m) for m in ctx.needs_input_grad[:3]]
    if not any(mask):
        return (None,) * 6
    with backward_scope(ctx):
        g = backward_op(ctx, _lp_bwd_op, _lp_bwd_impl)(grad.contiguous(), x, x_next, v, t, t_next, sigma, mask)
    return tuple(gi if m else None for gi, m in zip(g, mask)) + (None, None, None)


def _kl_setup(ctx, inputs, output):
    remember_backend(ctx)
    v, v_ref, t, t_next, sigma = inputs
    ctx.save_for_backward(v, v_ref, t, t_next, sigma)


def _kl_backward(ctx, grad):
    v, v_ref, t, t_next, sigma = ctx.saved_tensors
    mask = [bool(m) for m in ctx.needs_input_grad[:2]]
    if not any(mask):
        return (None,) * 5
    with backward_scope(ctx):
        g = backward_op(ctx, _kl_bwd_op, _kl_bwd_impl)(grad.contiguous(), v, v_ref, t, t_next, sigma, mask)
    return tuple(gi if m else None for gi, m in zip(g, mask)) + (None, None, None)


_step_eager = register_autograd(_step_op, "FlowStep", _step_impl, _step_setup, _step_backward)
_lp_eager = register_autograd(_lp_op, "FlowLogprob", _lp_impl, _lp_setup, _lp_backward)
_kl_eager = register_autograd(_kl_op, "FlowKL", _kl_impl, _kl_setup, _kl_backward)


# ----------------------------------------------------------------------------------- public API
@dataclass(frozen=True)
class SigmaSchedule:
    """Flow-GRPO's noise schedule sigma_t = noise_level * sqrt(s / (1 - s)) with s = 1 - t.

    At t = 0 (pure noise, s = 1) the ratio is infinite; as in Flow-GRPO (which substitutes the next step's
    sigma in the denominator) the denominator uses t_next there: sigma = a * sqrt(1 / t_next).
    """

    noise_level: float = 0.7

    def __post_init__(self):
        if not (math.isfinite(self.noise_level) and self.noise_level > 0):
            raise ValueError(f"SigmaSchedule.noise_level must be a finite positive float, got {self.noise_level}")

    def __call__(self, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        den = torch.where(t > 0, t, t_next)
        return self.noise_level * torch.sqrt((1 - t) / den)


def time_shift(t, a: float):
    """Cheers' time shift t' = a t / (1 + (a - 1) t) (a < 1 spends more steps near noise; Cheers uses 0.5).

    SD3-style shift by `b` on s = 1 - t (R3's "time shift 3.0") equals ``time_shift(t, 1 / b)``.
    Works on floats and tensors (differentiable in t).
    """
    if not (isinstance(a, (int, float)) and math.isfinite(a) and a > 0):
        raise ValueError(f"time_shift: a must be a finite positive number, got {a!r}")
    if isinstance(t, torch.Tensor):
        if value_checks_enabled(t) and t.numel() and bool(((t < 0) | (t > 1) | ~torch.isfinite(t)).any()):
            raise ValueError(f"time_shift: t must lie in [0, 1] (t = 1 is clean), got {t.tolist()}")
        return a * t / (1 + (a - 1) * t)
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise TypeError(f"time_shift: t must be a number or a tensor, got {t!r} ({type(t).__name__})")
    t = float(t)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"time_shift: t must lie in [0, 1] (t = 1 is clean), got {t}")
    return a * t / (1 + (a - 1) * t)


def _per_sample(val, B: int, x: torch.Tensor, name: str) -> torch.Tensor:
    dtype = _stat_dtype(x)
    if isinstance(val, torch.Tensor):
        if not val.is_floating_point():
            raise TypeError(f"{name} must be a float or a floating-point tensor, got dtype {val.dtype}")
        if val.device != x.device:
            raise ValueError(f"{name} must be on the device of x ({x.device}), got {val.device}")
        if val.dim() == 0 or (val.dim() == 1 and val.shape[0] == 1 and B != 1):
            return val.reshape(1).to(dtype).expand(B).contiguous()
        if val.shape != (B,):
            raise ValueError(f"{name} must be a float, a scalar tensor or a ({B},) tensor (one per sample), "
                             f"got shape {tuple(val.shape)}")
        return val.to(dtype).contiguous()
    if isinstance(val, (int, float)):
        return torch.full((B,), float(val), dtype=dtype, device=x.device)
    raise TypeError(f"{name} must be a float or a tensor, got {type(val).__name__}")


def _flatten(x: torch.Tensor, name: str):
    check_tensor(x, name, dtypes=ALL_DTYPES, min_dim=1)
    return x.reshape(x.shape[0], math.prod(x.shape[1:])).contiguous()  # (-1 is ambiguous for an empty batch)


def _check_values(t, t_next, sigma, sde: bool):
    """Value checks of the per-sample scalars, read back in ONE device sync (they run on every call)."""
    if not value_checks_enabled(t, t_next, sigma) or t.numel() == 0:
        return
    flags = [((tt < 0) | (tt > 1) | ~torch.isfinite(tt)).any() for tt in (t, t_next)]
    flags.append((t_next <= t).any() if sde else torch.zeros((), dtype=torch.bool, device=t.device))
    if sigma is not None:
        flags.append((~torch.isfinite(sigma) | (sigma <= 0)).any())
    bad_t, bad_tn, bad_order, *bad_sigma = torch.stack(flags).tolist()
    if bad_sigma and bad_sigma[0]:
        raise ValueError(f"sigma must be finite and > 0, got {sigma.tolist()}")
    for name, tt, bad in (("t", t, bad_t), ("t_next", t_next, bad_tn)):
        if bad:
            raise ValueError(f"{name} must lie in [0, 1] (Cheers convention: t = 1 is clean), got {tt.tolist()}")
    if bad_order:
        raise ValueError("an SDE step needs t < t_next (sampling runs from noise t = 0 to clean t = 1), "
                         f"got t={t.tolist()} t_next={t_next.tolist()}")


def _resolve_sigma(sigma, t, t_next, B, x):
    if sigma is None:
        raise ValueError("this op needs sigma: a float, a (B,) tensor or a SigmaSchedule, got None")
    if isinstance(sigma, SigmaSchedule):
        s = sigma(t, t_next)
    else:
        s = _per_sample(sigma, B, x, "sigma")
    return s.to(_stat_dtype(x)).contiguous()


@autocast_policy("promote")
def flow_step(x, v, t, t_next, noise=None, sigma=None, return_logprob: bool = False):
    """One sampler step x_t -> x_{t_next} on a batch of latents with per-sample times.

    Args:
        x, v: (B, ...) latents and predicted velocity (same shape, dtype float32/bfloat16/float16, or
            float64 on the reference backend).
        t, t_next: floats or (B,) tensors in [0, 1] (t = 1 clean).
        noise: None for the deterministic Euler step x + (t_next - t) v; else standard-normal z (shape of x)
            for the SDE transition (Flow-GRPO), which then needs `sigma`.
        sigma: float (constant over t), (B,) tensor, or ``SigmaSchedule(noise_level)``.
        return_logprob: also return the Gaussian log-prob of the returned x_next (float32 (B,), mean over
            elements), computed from x_next as rounded to x's dtype, so it equals
            ``flow_logprob(x, x_next, v, ...)``.  Not differentiable: use flow_logprob to train through it.

    Returns x_next (shape and dtype of x), or (x_next, logprob).  Differentiable in x, v and noise.
    """
    check_tensor(x, "x", min_dim=1)
    check_like(v, x, "v", "x")
    B = x.shape[0]
    t_ = _per_sample(t, B, x, "t")
    tn_ = _per_sample(t_next, B, x, "t_next")
    sde = noise is not None
    if sde:
        check_like(noise, x, "noise", "x")
        s_ = _resolve_sigma(sigma, t_, tn_, B, x)
    else:
        if sigma is not None:
            raise ValueError("an SDE step (sigma given) needs noise, got noise=None: pass noise=torch.randn_like(x), "
                             "or drop sigma for the Euler step")
        if return_logprob:
            raise ValueError("return_logprob needs an SDE step (noise and sigma): an Euler step is deterministic")
        s_ = None
    _check_values(t_, tn_, s_, sde)
    x2 = _flatten(x, "x")
    out, lp = dispatch(_step_op, _step_eager, _step_impl, x2, x2, _flatten(v, "v"),
                       _flatten(noise, "noise") if sde else None, t_, tn_, s_, bool(return_logprob))
    out = out.reshape(x.shape)
    return (out, lp) if return_logprob else out


@autocast_policy("promote")
def flow_logprob(x, x_next, v, t, t_next, sigma, reduction: str = "mean"):
    """Log-prob of a given x_next (e.g. a rollout's recorded sample) under the SDE transition with velocity v.

    Returns float32 (B,): the Gaussian log-density averaged over elements ("mean", as CLEAR and R3 use) or
    summed ("sum").  Differentiable in v (what GRPO trains through), x and x_next.
    """
    check_tensor(x, "x", min_dim=1)
    check_like(x_next, x, "x_next", "x")
    check_like(v, x, "v", "x")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    B = x.shape[0]
    t_ = _per_sample(t, B, x, "t")
    tn_ = _per_sample(t_next, B, x, "t_next")
    s_ = _resolve_sigma(sigma, t_, tn_, B, x)
    _check_values(t_, tn_, s_, True)
    if B and x[0].numel() == 0:
        raise ValueError(f"flow_logprob: each sample must have at least one element, got shape {tuple(x.shape)}")
    xf = _flatten(x, "x")
    lp = dispatch(_lp_op, _lp_eager, _lp_impl, xf, xf, _flatten(x_next, "x_next"), _flatten(v, "v"), t_, tn_, s_)
    return lp * x[0].numel() if reduction == "sum" and B else lp


@autocast_policy("promote")
def flow_kl(v, v_ref, t, t_next, sigma, reduction: str = "mean"):
    """KL(policy || reference) between the SDE transitions with velocities v and v_ref from the same x.

    = mean over elements of ((mean_v - mean_ref)^2) / (2 std^2) (Flow-GRPO's KL term); float32 (B,).
    Differentiable in v and v_ref.
    """
    check_tensor(v, "v", min_dim=1)
    check_like(v_ref, v, "v_ref", "v")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    B = v.shape[0]
    t_ = _per_sample(t, B, v, "t")
    tn_ = _per_sample(t_next, B, v, "t_next")
    s_ = _resolve_sigma(sigma, t_, tn_, B, v)
    _check_values(t_, tn_, s_, True)
    if B and v[0].numel() == 0:
        raise ValueError(f"flow_kl: each sample must have at least one element, got shape {tuple(v.shape)}")
    vf = _flatten(v, "v")
    kl = dispatch(_kl_op, _kl_eager, _kl_impl, vf, vf, _flatten(v_ref, "v_ref"), t_, tn_, s_)
    return kl * v[0].numel() if reduction == "sum" and B else kl
