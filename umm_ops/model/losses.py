"""Losses of the unified model, as the released Cheers computes them.

* text: summed token cross-entropy / number of non-ignored labels (labels already next-token aligned, -100 ignored);
* flow: one mean of the squared velocity error over every element of every generated image in the batch
  (``v_pred`` vs ``x_data - noise``, t = 1 clean);
* total: ``text_weight * text + flow_weight * flow``.

Only the rows that carry a label go through the LM head (the logits of a packed batch are never materialised for
image or prompt tokens), and with the head's weight given (``CheersConfig.fused_text_loss``, the default) not even
theirs: ``umm_ops.linear_cross_entropy`` computes the loss block by block (issue 19).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["text_loss", "token_logprobs", "flow_loss", "flow_target", "add_noise", "IGNORE_INDEX"]

IGNORE_INDEX = -100


def text_loss(hidden: torch.Tensor, labels: torch.Tensor, logits_fn, weight: torch.Tensor | None = None,
              bias: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """hidden (L, D), labels (L,) -> (mean CE over labelled tokens, number of labelled tokens).

    logits_fn: the LM head, (n, D) -> (n, V) logits (the plain path).  weight (V, D) / bias (V,): the same head's
    parameters; when given, the loss is ``umm_ops.linear_cross_entropy`` of them (no (n, V) logits, in float32 like
    the plain path's ``.float()`` logits) and logits_fn is not called.
    With no labelled token the loss is a zero that still depends on ``hidden`` (so every rank's graph has the same
    parameters in a distributed step)."""
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be (L,) = ({hidden.shape[0]},), got {tuple(labels.shape)}")
    mask = labels != IGNORE_INDEX
    n = int(mask.sum())
    if n == 0:
        return hidden[:1].sum() * 0.0, 0
    if weight is not None:
        from ..ops.lm_head import linear_cross_entropy

        return linear_cross_entropy(hidden[mask], weight, labels[mask], bias, reduction="sum") / n, n
    logits = logits_fn(hidden[mask]).float()
    return F.cross_entropy(logits, labels[mask], reduction="sum") / n, n


def token_logprobs(hidden: torch.Tensor, labels: torch.Tensor, logits_fn, weight: torch.Tensor | None = None,
                   temperature: float = 1.0, return_entropy: bool = False):
    """Log-probs (and entropies) of the labelled tokens under the LM head, for RL (GRPO's ratio and KL, the entropy
    bonus): hidden (L, D), labels (L,) next-token aligned with IGNORE_INDEX elsewhere -> float32 (n,) over the n
    labelled rows in order (and (n,) entropies).  weight (V, D): the head's weight, then computed by
    ``umm_ops.linear_logprob`` without the (n, V) logits; None: the plain path through logits_fn (the switch of
    ``CheersConfig.fused_text_loss``).  Differentiable in hidden (and the head)."""
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be (L,) = ({hidden.shape[0]},), got {tuple(labels.shape)}")
    mask = labels != IGNORE_INDEX
    h, t = hidden[mask], labels[mask]
    if weight is not None:
        from ..ops.lm_head import linear_logprob

        return linear_logprob(h, weight, t, temperature=temperature, return_entropy=return_entropy)
    logp = torch.log_softmax(logits_fn(h).float() / temperature, -1)
    lp = logp.gather(1, t[:, None])[:, 0]
    return (lp, -(logp.exp() * logp).sum(-1)) if return_entropy else lp


def add_noise(x_data: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = t x_data + (1 - t) noise, t (N,) broadcast over the remaining dims (t = 1 clean)."""
    t = t.to(x_data.dtype).reshape(-1, *([1] * (x_data.dim() - 1)))
    return t * x_data + (1 - t) * noise


def flow_target(x_data: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity d x_t / d t = x_data - noise."""
    return x_data - noise


def flow_loss(v_preds: list, targets: list) -> tuple[torch.Tensor, int]:
    """One mean over every element of every generated image: sum of squared errors / total elements."""
    if len(v_preds) != len(targets):
        raise ValueError(f"flow_loss: {len(v_preds)} predictions for {len(targets)} targets")
    if not v_preds:
        return None, 0
    sse = sum(((v.float() - y.float()) ** 2).sum() for v, y in zip(v_preds, targets))
    n = sum(y.numel() for y in targets)
    return sse / n, n
