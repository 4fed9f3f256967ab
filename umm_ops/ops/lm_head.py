"""The LM head with its loss, without the (N, V) logits (issue 19): linear_cross_entropy and linear_logprob.

The logits are the largest tensor of a language model's training step (Cheers' 151,936-token vocabulary: 8,192
tokens of float32 logits are 5 GB, and as much again for their gradient; RL needs them for the policy, the old
policy and the reference).  These ops compute the loss (or the token log-probs and entropy) chunk by chunk, as
Liger-Kernel's fused linear cross-entropy and Apple's Cut Cross-Entropy do, so that the full logits never exist:

* CPU (C++, csrc/torch/lm_head_ops.cpp + csrc/cpu/lm_head.cpp): blocks of rows; per block one GEMM (at::mm:
  MKL / oneDNN) writes the block's logits (rows x V, ~64 MB of logits but at least 512 rows) into a workspace, one
  fused pass per row computes the soft cap, the log-sum-exp, the target logit and the row sums and, when
  gradients are wanted, overwrites the logits with their gradient; two more GEMMs give the block's hidden gradient and add its weight gradient.  With reduction
  "sum" / "mean" the gradients come out of the forward (3 GEMMs in all, as eager, instead of 4: the backward only
  scales them by the upstream scalar); with "none" and for linear_logprob the backward recomputes the logits.
  Deterministic: fixed block sizes, sums in a fixed order.
* Triton (umm_ops/triton/lm_head.py): a statistics kernel (online log-sum-exp over vocabulary tiles), a hidden-
  gradient kernel over row tiles and a weight-gradient kernel over vocabulary tiles, each recomputing its logit
  tiles (no atomics, no logits in memory).
* CUDA (csrc/cuda/lm_head.cu): the CPU design with the row pass as a CUDA kernel (one block per row) and the GEMMs
  through cuBLAS (at::mm).  Compiled, never run: no GPU was available where it was written.
* Reference (umm_ops/reference/lm_head.py): the literal computation with the full logits; float64.

With reduction "sum" / "mean" the forward hands its gradients to the backward, which scales them by the upstream
scalar (in place in eager mode): a second backward through the same loss (retain_graph=True) is refused; use
reduction "none" for that.

Conventions: hidden (N, D), weight (V, D) (nn.Linear / embedding layout: tied embeddings pass the embedding
matrix), targets (N,) integer.  Losses, log-probs and entropies are float32 (float64 for float64 inputs) whatever
the input dtype; gradients have the input dtype.  The GEMMs run in the input dtype with float32 accumulation, as
eager ``hidden @ weight.T`` does.
"""
from __future__ import annotations

import contextlib
import math

import torch

from ..backend import value_checks_enabled
from ..reference.lm_head import REDUCTIONS
from ._common import (
    ALL_DTYPES,
    autocast_policy,
    backward_op,
    backward_scope,
    check_like,
    check_tensor,
    dispatch,
    kernels,
    needs_grad,
    register_autograd,
    register_fake_both,
    remember_backend,
)

__all__ = ["linear_cross_entropy", "linear_logprob", "chunk_rows"]

_S_LCE = ("(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, int ignore_index, float label_smoothing, "
          "float z_loss, float softcap, str reduction, bool[3] grad_mask, int chunk_rows) "
          "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")
_S_LCE_BWD = ("(Tensor grad, Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor lse, "
              "int ignore_index, float label_smoothing, float z_loss, float softcap, bool[3] mask, int chunk_rows) "
              "-> (Tensor, Tensor, Tensor)")
_S_LP = ("(Tensor hidden, Tensor weight, Tensor targets, float temperature, bool want_entropy, int chunk_rows) "
         "-> (Tensor, Tensor, Tensor)")
_S_LP_BWD = ("(Tensor grad_logprob, Tensor grad_entropy, Tensor hidden, Tensor weight, Tensor targets, Tensor lse, "
             "Tensor entropy, float temperature, bool[2] mask, int chunk_rows) -> (Tensor, Tensor)")

# Rows of logits per chunk (0: the kernel's own choice, sized from V).  Tests and benchmarks set it to exercise
# ragged chunks; it changes memory and speed, never the meaning (the values only to float rounding: the GEMM
# library may pick another kernel for another row count, and the weight gradient is summed chunk by chunk).
# A plain module global, not a ContextVar: torch.compile traces a global read (and guards on it), not
# ContextVar.get.  Process-wide, like use_cpu_isa.
_CHUNK_ROWS = 0


@contextlib.contextmanager
def chunk_rows(n: int):
    """Rows of logits per chunk inside the block (0 = automatic: the CPU kernel takes ~64 MB of logits per chunk
    but at least 512 rows), process-wide."""
    global _CHUNK_ROWS
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"chunk_rows must be an int >= 0, got {n!r}")
    before, _CHUNK_ROWS = _CHUNK_ROWS, n
    try:
        yield
    finally:
        _CHUNK_ROWS = before


# ----------------------------------------------------------------------------------- custom ops
def _lce_impl(hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss, softcap, reduction, grad_mask,
              chunk):
    return kernels(hidden, "linear_cross_entropy").linear_cross_entropy(
        hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss, softcap, reduction, list(grad_mask),
        chunk)


def _lce_bwd_impl(grad, hidden, weight, bias, targets, lse, ignore_index, label_smoothing, z_loss, softcap, mask,
                  chunk):
    return kernels(hidden, "linear_cross_entropy_backward").linear_cross_entropy_backward(
        grad, hidden, weight, bias, targets, lse, ignore_index, label_smoothing, z_loss, softcap, list(mask), chunk)


def _lp_impl(hidden, weight, targets, temperature, want_entropy, chunk):
    return kernels(hidden, "linear_logprob").linear_logprob(hidden, weight, targets, temperature, want_entropy, chunk)


def _lp_bwd_impl(grad_logprob, grad_entropy, hidden, weight, targets, lse, entropy, temperature, mask, chunk):
    return kernels(hidden, "linear_logprob_backward").linear_logprob_backward(
        grad_logprob, grad_entropy, hidden, weight, targets, lse, entropy, temperature, list(mask), chunk)


_lce_op = torch.library.custom_op("umm_ops::linear_cross_entropy", _lce_impl, mutates_args=(), schema=_S_LCE)
_lce_bwd_op = torch.library.custom_op("umm_ops::linear_cross_entropy_backward", _lce_bwd_impl, mutates_args=(),
                                      schema=_S_LCE_BWD)
_lp_op = torch.library.custom_op("umm_ops::linear_logprob", _lp_impl, mutates_args=(), schema=_S_LP)
_lp_bwd_op = torch.library.custom_op("umm_ops::linear_logprob_backward", _lp_bwd_impl, mutates_args=(),
                                     schema=_S_LP_BWD)


# ----------------------------------------------------------------------------------- fake kernels
def _sd(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fake_lce(hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss, softcap, reduction, grad_mask,
              chunk):
    N = hidden.shape[0]
    loss = hidden.new_empty((N,) if reduction == "none" else (), dtype=_sd(hidden))
    fused = reduction != "none"
    e = hidden.new_empty((0,))
    return (loss, hidden.new_empty((N,), dtype=_sd(hidden)),
            torch.empty_like(hidden) if fused and grad_mask[0] else e,
            torch.empty_like(weight) if fused and grad_mask[1] else hidden.new_empty((0,)),
            torch.empty_like(bias) if fused and grad_mask[2] and bias is not None else hidden.new_empty((0,)))


def _fake_lce_bwd(grad, hidden, weight, bias, targets, lse, ignore_index, label_smoothing, z_loss, softcap, mask,
                  chunk):
    return (torch.empty_like(hidden) if mask[0] else hidden.new_empty((0,)),
            torch.empty_like(weight) if mask[1] else hidden.new_empty((0,)),
            torch.empty_like(bias) if mask[2] and bias is not None else hidden.new_empty((0,)))


def _fake_lp(hidden, weight, targets, temperature, want_entropy, chunk):
    N = hidden.shape[0]
    sd = _sd(hidden)
    return (hidden.new_empty((N,), dtype=sd), hidden.new_empty((N if want_entropy else 0,), dtype=sd),
            hidden.new_empty((N,), dtype=sd))


def _fake_lp_bwd(grad_logprob, grad_entropy, hidden, weight, targets, lse, entropy, temperature, mask, chunk):
    return (torch.empty_like(hidden) if mask[0] else hidden.new_empty((0,)),
            torch.empty_like(weight) if mask[1] else hidden.new_empty((0,)))


register_fake_both("linear_cross_entropy", _fake_lce)
register_fake_both("linear_cross_entropy_backward", _fake_lce_bwd)
register_fake_both("linear_logprob", _fake_lp)
register_fake_both("linear_logprob_backward", _fake_lp_bwd)


# ----------------------------------------------------------------------------------- autograd
def _lce_setup(ctx, inputs, output):
    remember_backend(ctx)
    ctx.set_materialize_grads(False)
    hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss, softcap, reduction, grad_mask, chunk = inputs
    _, lse, dh, dw, db = output
    ctx.params = (ignore_index, label_smoothing, z_loss, softcap, chunk)
    ctx.has_bias = bias is not None
    # with reduction "sum" / "mean" the forward computed the gradients already (those of its grad_mask)
    ctx.fused = reduction != "none"
    ctx.grad_mask = tuple(bool(m) for m in grad_mask)
    if ctx.fused:
        ctx.save_for_backward(dh, dw, db)
    else:
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
    ctx.mark_non_differentiable(lse, dh, dw, db)


def _lce_backward(ctx, grad, *_rest):
    nig = ctx.needs_input_grad
    mask = [bool(nig[0]), bool(nig[1]), bool(nig[2]) and ctx.has_bias]
    if grad is None or not any(mask):
        return (None,) * 11
    if ctx.fused:
        if any(m and not f for m, f in zip(mask, ctx.grad_mask)):
            raise RuntimeError("linear_cross_entropy: a gradient was asked for an input that did not require grad "
                               "when the forward ran (the forward of reduction 'sum' / 'mean' computes them)")
        g = grad.reshape(())
        if getattr(ctx, "umm_eager", False):
            # eager: scale the forward's gradients in place (no second weight-sized tensor; once the node releases
            # them, AccumulateGrad takes the tensor as it is); a second backward through this node would find them
            # scaled, so it is refused
            if getattr(ctx, "grads_taken", False):
                raise RuntimeError("linear_cross_entropy with reduction 'sum' / 'mean' computes its gradients in the "
                                   "forward and hands them out once: a second backward through it (retain_graph="
                                   "True) is not supported; use reduction='none' and sum / average the result")
            ctx.grads_taken = True
            one = g.device.type == "cpu" and bool(g == 1)
            out = tuple((t if one else t.mul_(g.to(t.dtype))) if m else None for t, m in zip(ctx.saved_tensors, mask))
        else:
            out = tuple(t * g.to(t.dtype) if m else None for t, m in zip(ctx.saved_tensors, mask))
        return out + (None,) * 8
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    ignore_index, label_smoothing, z_loss, softcap, chunk = ctx.params
    with backward_scope(ctx):
        g = backward_op(ctx, _lce_bwd_op, _lce_bwd_impl)(
            grad.to(lse.dtype).contiguous(), hidden, weight, bias, targets, lse, ignore_index, label_smoothing,
            z_loss, softcap, mask, chunk)
    return tuple(gi if m else None for gi, m in zip(g, mask)) + (None,) * 8


def _lp_setup(ctx, inputs, output):
    remember_backend(ctx)
    ctx.set_materialize_grads(False)
    hidden, weight, targets, temperature, want_entropy, chunk = inputs
    _, entropy, lse = output
    ctx.params = (temperature, chunk)
    ctx.save_for_backward(hidden, weight, targets, lse, entropy)
    ctx.mark_non_differentiable(lse)
    if not want_entropy:
        ctx.mark_non_differentiable(entropy)


def _lp_backward(ctx, grad_logprob, grad_entropy, _grad_lse):
    hidden, weight, targets, lse, entropy = ctx.saved_tensors
    mask = [bool(m) for m in ctx.needs_input_grad[:2]]
    if not any(mask) or (grad_logprob is None and grad_entropy is None):
        return (None,) * 6
    temperature, chunk = ctx.params
    gl = torch.zeros_like(lse) if grad_logprob is None else grad_logprob.to(lse.dtype).contiguous()
    ge = lse.new_empty(0) if grad_entropy is None or entropy.numel() == 0 else grad_entropy.to(lse.dtype).contiguous()
    with backward_scope(ctx):
        g = backward_op(ctx, _lp_bwd_op, _lp_bwd_impl)(gl, ge, hidden, weight, targets, lse, entropy, temperature,
                                                       mask, chunk)
    return tuple(gi if m else None for gi, m in zip(g, mask)) + (None,) * 4


_lce_eager = register_autograd(_lce_op, "LinearCrossEntropy", _lce_impl, _lce_setup, _lce_backward)
_lp_eager = register_autograd(_lp_op, "LinearLogprob", _lp_impl, _lp_setup, _lp_backward)


# ----------------------------------------------------------------------------------- public API
def _number(v, name: str, *, lo: float, lo_open: bool = False, hi: float | None = None) -> float:
    """A finite int / float (not a bool) in [lo, hi] ((lo, hi] with lo_open)."""
    rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}{']' if hi is not None else ')'}"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a finite number in {rng}, got {v!r} ({type(v).__name__})")
    v = float(v)
    if not math.isfinite(v) or v < lo or (lo_open and v == lo) or (hi is not None and v > hi):
        raise ValueError(f"{name} must be a finite number in {rng}, got {v!r}")
    return v


def _check_head(hidden, weight, targets, bias=None):
    check_tensor(hidden, "hidden", dtypes=ALL_DTYPES, dim=2)
    check_like(weight, hidden, "weight", "hidden", shape=False)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be (V, D) with D = hidden.shape[1] = {hidden.shape[1]} (nn.Linear / embedding "
                         f"layout), got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (a vocabulary of V >= 1 tokens), got shape "
                         f"{tuple(weight.shape)}")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor of token ids, got {type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be an int64 or int32 tensor of token ids, got dtype "
                        f"{str(targets.dtype).replace('torch.', '')}")
    if targets.device != hidden.device:
        raise ValueError(f"targets must be on the device of hidden ({hidden.device}), got {targets.device}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must have shape (N,) = ({hidden.shape[0]},) (one per row of hidden), got "
                         f"{tuple(targets.shape)}")
    if bias is not None:
        check_like(bias, hidden, "bias", "hidden", shape=False)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must have shape (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    return targets.to(torch.int64).contiguous()


def _check_target_values(targets, V: int, ignore_index: int | None) -> None:
    """Targets in [0, V) (or ignore_index): one device read, skipped with the value checks off (the CPU kernel
    checks them anyway: it indexes with them)."""
    if not value_checks_enabled(targets) or targets.numel() == 0:
        return
    ok = (targets >= 0) & (targets < V)
    if ignore_index is not None:
        ok |= targets == ignore_index
    if not bool(ok.all()):
        i = int((~ok).nonzero()[0, 0])
        extra = "" if ignore_index is None else f" or equal ignore_index ({ignore_index})"
        raise ValueError(f"targets must lie in [0, V) = [0, {V}){extra}, got targets[{i}] = {int(targets[i])}")


@autocast_policy("lower")
def linear_cross_entropy(hidden, weight, targets, bias=None, ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None):
    """``F.cross_entropy(hidden @ weight.T + bias, targets, ...)`` without the (N, V) logits.

    Args:
        hidden: (N, D) float32 / bfloat16 / float16 (float64 on the reference backend); N may be 0.
        weight: (V, D), dtype and device of hidden (the LM head's nn.Linear weight, or the tied embedding matrix).
        targets: (N,) int64 / int32 in [0, V), or ``ignore_index`` for rows without a label.
        bias: (V,) or None.
        reduction: "mean" (over the labelled rows; nan when there is none, as F.cross_entropy), "sum" or "none".
        label_smoothing: in [0, 1], as F.cross_entropy: ``(1 - eps) nll + eps * mean_j(-log p_j)``.
        z_loss: >= 0: adds ``z_loss * logsumexp(logits)^2`` per labelled row (PaLM's auxiliary loss).
        softcap: None or > 0: the logits become ``softcap * tanh(logits / softcap)`` first (Gemma 2).
    Returns a float32 0-dim tensor ("mean" / "sum") or (N,) ("none", 0 for ignored rows); float64 for float64
    inputs.  Differentiable in hidden, weight and bias.
    """
    tg = _check_head(hidden, weight, targets, bias)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r} ({type(ignore_index).__name__})")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    eps = _number(label_smoothing, "label_smoothing", lo=0.0, hi=1.0)
    zl = _number(z_loss, "z_loss", lo=0.0)
    cap = 0.0 if softcap is None else _number(softcap, "softcap", lo=0.0, lo_open=True)
    _check_target_values(tg, weight.shape[0], ignore_index)
    grad = needs_grad(hidden, weight, bias)
    gm = [bool(grad and hidden.requires_grad), bool(grad and weight.requires_grad),
          bool(grad and bias is not None and bias.requires_grad)]
    args = (hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), tg,
            int(ignore_index), eps, zl, cap, reduction, gm, _CHUNK_ROWS)
    return dispatch(_lce_op, _lce_eager, _lce_impl, hidden, *args, grad=grad)[0]


@autocast_policy("lower")
def linear_logprob(hidden, weight, targets, temperature: float = 1.0, return_entropy: bool = False):
    """Per-token ``log softmax(hidden @ weight.T / temperature)[target]`` (and the entropy) without the logits.

    The token log-probs of RL (policy, old policy, reference: GRPO's ratio and KL) and the entropy bonus.

    Args:
        hidden: (N, D); weight: (V, D) (dtype and device of hidden); targets: (N,) int64 / int32 in [0, V).
        temperature: > 0 (the sampling temperature the tokens were drawn at).
        return_entropy: also return the entropy of each row's distribution.
    Returns logprob (N,) float32 (float64 for float64 inputs), or (logprob, entropy).  Both are differentiable in
    hidden and weight.
    """
    tg = _check_head(hidden, weight, targets)
    temp = _number(temperature, "temperature", lo=0.0, lo_open=True)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {return_entropy!r} ({type(return_entropy).__name__})")
    _check_target_values(tg, weight.shape[0], None)
    args = (hidden.contiguous(), weight.contiguous(), tg, temp, return_entropy, _CHUNK_ROWS)
    lp, ent, _ = dispatch(_lp_op, _lp_eager, _lp_impl, hidden, *args)
    return (lp, ent) if return_entropy else lp
