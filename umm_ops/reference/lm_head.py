"""Reference (plain PyTorch, float64-capable, autograd) of the LM-head op family (issue 19): the language-model head
followed by the token cross-entropy, or by the token log-probs (and entropy) that RL needs.

Written the literal way: the full (N, V) logits, a log-softmax, a gather.  Conventions shared by every backend
(docs live in umm_ops/ops/lm_head.py):

* logits ``z = hidden @ weight.T (+ bias)`` (weight in nn.Linear / embedding layout (V, D), so tied embeddings
  pass the embedding matrix as it is), then for the cross-entropy an optional Gemma-2 soft cap
  ``z' = softcap * tanh(z / softcap)``, for the log-probs a temperature ``z' = z / temperature``.
* cross-entropy of a labelled row: ``(1 - eps) (lse - z'_t) + eps (lse - mean_j z'_j) + z_loss lse^2`` with
  ``lse = logsumexp(z')`` (label smoothing as ``F.cross_entropy`` defines it, PaLM's z-loss); rows whose target is
  ``ignore_index`` give 0; "mean" divides the sum by the number of labelled rows (0 / 0 = nan when there is none,
  as ``F.cross_entropy``).
* log-prob of a row: ``z'_t - lse``; entropy ``lse - sum_j p_j z'_j`` with ``p = softmax(z')``.
"""
from __future__ import annotations

import torch

__all__ = ["logits", "linear_cross_entropy", "linear_logprob", "REDUCTIONS"]

REDUCTIONS = ("mean", "sum", "none")


def logits(hidden, weight, bias=None):
    """(N, D) @ (V, D)^T (+ (V,)) -> (N, V)."""
    z = hidden @ weight.t()
    return z if bias is None else z + bias


def linear_cross_entropy(hidden, weight, targets, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, z_loss=0.0, softcap=None):
    """Per-row losses (reduction "none", (N,)) or their sum / mean over labelled rows, in hidden's dtype."""
    z = logits(hidden, weight, bias)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    valid = targets != ignore_index
    safe_t = torch.where(valid, targets, torch.zeros_like(targets))
    logp = torch.log_softmax(z, dim=-1)
    lse = torch.logsumexp(z, dim=-1)
    nll = -logp.gather(1, safe_t[:, None])[:, 0]
    smooth = -logp.mean(-1)
    loss = (1 - label_smoothing) * nll + label_smoothing * smooth + z_loss * lse**2
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / valid.sum()
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def linear_logprob(hidden, weight, targets, temperature=1.0, return_entropy=False):
    """log softmax(hidden @ weight.T / temperature)[target] per row (N,), and the entropy (N,) when asked."""
    z = logits(hidden, weight) / temperature
    logp = torch.log_softmax(z, dim=-1)
    lp = logp.gather(1, targets[:, None])[:, 0]
    if not return_entropy:
        return lp
    return lp, -(logp.exp() * logp).sum(-1)
