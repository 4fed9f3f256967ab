"""The losses of online RL for unified models, as plain functions that other code and outside checks can call.

* :func:`group_advantages`: GRPO's group-relative advantage, reward minus the group mean, optionally divided by the
  group's standard deviation (GRPO, TRL's default) or not (Dr.GRPO; R3 and CLEAR's image branch).
* :func:`kl_k3`: the k3 estimator of KL(policy || reference) per token, exp(ref - logp) - (ref - logp) - 1
  (Schulman's "Approximating KL divergence"; what GRPO, TRL, R3 and CLEAR use for text).
* :func:`token_pg_loss`: token-level PPO-clip with an optional k3 KL to a frozen reference, under the three
  normalisations in use (per-token mean over the batch, per-sequence mean, Dr.GRPO's constant length).
* :func:`flow_pg_loss`: PPO-clip on the ratio of the recorded SDE transitions' log-probs (``umm_ops.flow_logprob``,
  a mean over elements as CLEAR and R3 use), with an optional KL to the reference's velocity (``umm_ops.flow_kl``).

Sign convention: every loss is minimised; the policy-gradient term of one token (or recorded image step) is
``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)`` with ``r = exp(logp - old_logp)``, so at the first PPO epoch
(old = current, r = 1) its gradient is ``-A grad logp``: the plain policy gradient.
"""
from __future__ import annotations

import math

import torch

__all__ = ["group_advantages", "kl_k3", "ppo_clip_objective", "token_pg_loss", "flow_pg_loss", "NORMS"]

NORMS = ("token", "sequence", "constant")


def _check_float(x, name: str, dim: int | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = f"{x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{name} must be a floating-point tensor, got {got}")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimension(s), got shape {tuple(x.shape)}")
    return x


def _clip_range(clip) -> tuple:
    """clip: eps (symmetric) or (eps_low, eps_high) (DAPO's clip-higher); each finite and >= 0."""
    lo, hi = (clip, clip) if isinstance(clip, (int, float)) and not isinstance(clip, bool) else \
        tuple(clip) if isinstance(clip, (tuple, list)) and len(clip) == 2 else (None, None)
    if lo is None or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) and c >= 0
                             for c in (lo, hi)):
        raise ValueError(f"clip must be a finite float >= 0 or a pair (low, high) of them, got {clip!r}")
    return float(lo), float(hi)


def _check_weight(w, name: str) -> float:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        raise ValueError(f"{name} must be a finite float >= 0, got {w!r}")
    return float(w)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "none", eps: float = 1e-4) -> torch.Tensor:
    """rewards (B,) with B = groups x group_size, consecutive samples forming a group -> advantages (B,) float32.

    A = r - mean(group); with ``scale="std"`` divided by (std(group) + eps), the unbiased std as TRL's GRPOTrainer
    (a group of equal rewards gives A = 0 either way).  Non-finite rewards are an error (a NaN would spread to the
    whole group silently)."""
    _check_float(rewards, "rewards", 1)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"rewards ({rewards.shape[0]},) is not a whole number of groups of {group_size} "
                         f"(consecutive samples form a group)")
    if scale not in ("none", "std"):
        raise ValueError(f"scale must be 'none' (Dr.GRPO: reward - group mean) or 'std' (GRPO: also / group std), "
                         f"got {scale!r}")
    if not bool(torch.isfinite(rewards).all()):
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()
        raise ValueError(f"rewards must be finite, got non-finite values at {bad}: {rewards[bad].tolist()}")
    r = rewards.float().view(-1, group_size)
    a = r - r.mean(1, keepdim=True)
    if scale == "std":
        sd = r.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        a = a / (sd + eps)
    return a.reshape(-1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-element k3 estimate of KL(policy || reference) from samples of the policy:
    exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased for the KL; its gradient in logp is 1 - exp(ref - logp))."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def ppo_clip_objective(logp, old_logp, advantages, clip=0.2):
    """Per-element PPO-clip loss -min(r A, clip(r, 1 - lo, 1 + hi) A) with r = exp(logp - old_logp), and the ratio
    and where clipping engaged (the pessimistic term is the clipped one and differs from the unclipped one)."""
    lo, hi = _clip_range(clip)
    ratio = torch.exp(logp - old_logp)
    un = ratio * advantages
    cl = ratio.clamp(1.0 - lo, 1.0 + hi) * advantages
    loss = -torch.minimum(un, cl)
    clipped = cl < un
    return loss, ratio, clipped


def token_pg_loss(logp, old_logp, advantages, mask, ref_logp=None, clip=0.2, kl_beta: float = 0.0,
                  norm: str = "token", max_len: int | None = None):
    """Token-level PPO-clip (+ k3 KL) over a batch of sampled continuations.

    Args:
        logp: (B, T) log-probs of the sampled tokens under the policy being trained (differentiable).
        old_logp: (B, T) the same under the policy that sampled them (no gradient is taken through it).
        advantages: (B,) one advantage per sequence, the same for each of its tokens.
        mask: (B, T) bool / 0-1: the tokens that count (padding and prompt 0).
        ref_logp: (B, T) under the frozen reference, needed when ``kl_beta`` > 0.
        clip: eps or (eps_low, eps_high).  kl_beta: weight of the k3 KL per token.
        norm: "token" (sum over the batch's unmasked tokens / their count: GRPO as in DAPO / TRL's "dapo" and
            "bnpo"), "sequence" (each sequence's token mean, then the mean over sequences: the original GRPO),
            "constant" (sum / (B * max_len): Dr.GRPO; ``max_len`` defaults to T).
    Returns (loss, stats): stats are floats (pg_loss, kl, ratio_mean, ratio_max, clip_frac, tokens).
    """
    for name, x in (("logp", logp), ("old_logp", old_logp)):
        _check_float(x, name, 2)
    if old_logp.shape != logp.shape:
        raise ValueError(f"old_logp must have logp's shape {tuple(logp.shape)}, got {tuple(old_logp.shape)}")
    if not isinstance(mask, torch.Tensor) or mask.shape != logp.shape:
        raise ValueError(f"mask must be a tensor of logp's shape {tuple(logp.shape)}, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    _check_float(advantages, "advantages", 1)
    B, T = logp.shape
    if advantages.shape[0] != B:
        raise ValueError(f"advantages must be ({B},) (one per sequence), got {tuple(advantages.shape)}")
    kl_beta = _check_weight(kl_beta, "kl_beta")
    if kl_beta > 0:
        if ref_logp is None:
            raise ValueError("kl_beta > 0 needs ref_logp (the reference model's log-probs of the sampled tokens)")
        _check_float(ref_logp, "ref_logp", 2)
        if ref_logp.shape != logp.shape:
            raise ValueError(f"ref_logp must have logp's shape {tuple(logp.shape)}, got {tuple(ref_logp.shape)}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
        raise ValueError(f"max_len must be None or an int >= 1, got {max_len!r}")
    m = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)[:, None]
    pg, ratio, clipped = ppo_clip_objective(logp, old_logp.detach(), adv, clip)
    per_tok = pg
    kl = None
    if kl_beta > 0:
        kl = kl_k3(logp, ref_logp.detach())
        per_tok = per_tok + kl_beta * kl
    n_tok = m.sum()

    def reduce(x):
        if norm == "token":
            return (x * m).sum() / n_tok.clamp(min=1)
        if norm == "sequence":
            per_seq = (x * m).sum(1) / m.sum(1).clamp(min=1)
            return per_seq.sum() / (m.sum(1) > 0).sum().clamp(min=1)
        return (x * m).sum() / (B * (max_len or T))

    loss = reduce(per_tok) if B and T else logp.sum() * 0.0
    with torch.no_grad():
        cnt = float(n_tok)
        sel = m > 0
        stats = {"pg_loss": float(reduce(pg)) if B and T else 0.0,
                 "kl": float((kl * m).sum() / max(cnt, 1.0)) if kl is not None else 0.0,
                 "ratio_mean": float(ratio[sel].mean()) if cnt else 1.0,
                 "ratio_max": float(ratio[sel].max()) if cnt else 1.0,
                 "clip_frac": float(clipped[sel].float().mean()) if cnt else 0.0,
                 "tokens": cnt}
    return loss, stats


def flow_pg_loss(logp, old_logp, advantages, kl=None, clip=1e-4, kl_beta: float = 0.0, mask=None,
                 adv_clip: float | None = None):
    """PPO-clip over recorded SDE steps of generated images (Flow-GRPO / CLEAR / R3's image loss).

    Args:
        logp: (B, S) ``umm_ops.flow_logprob(x_k, x_{k+1}, v_theta(x_k, t_k), t_k, t_{k+1}, sigma)`` of each
            trajectory's recorded steps under the current policy (differentiable; mean over elements).
        old_logp: (B, S) the same under the rollout policy.
        advantages: (B,) one per trajectory, the same for each of its steps.
        kl: (B, S) ``umm_ops.flow_kl(v_theta, v_ref, ...)`` per recorded step (needed when ``kl_beta`` > 0).
        clip: eps or (eps_low, eps_high) on the ratio (Flow-GRPO: 1e-4, the ratio of a mean-over-elements
            log-prob moves little; CLEAR and R3 use 0.2 text-style ranges on such ratios).
        mask: (B, S) bool: which steps were recorded (default all).
        adv_clip: clamp the advantages to [-adv_clip, adv_clip] first (Flow-GRPO: 5).
    The loss is the mean over recorded steps (and trajectories) of the PPO term, plus ``kl_beta`` times the mean
    KL.  Returns (loss, stats).
    """
    for name, x in (("logp", logp), ("old_logp", old_logp)):
        _check_float(x, name, 2)
    if old_logp.shape != logp.shape:
        raise ValueError(f"old_logp must have logp's shape {tuple(logp.shape)}, got {tuple(old_logp.shape)}")
    _check_float(advantages, "advantages", 1)
    B, S = logp.shape
    if advantages.shape[0] != B:
        raise ValueError(f"advantages must be ({B},) (one per trajectory), got {tuple(advantages.shape)}")
    if mask is None:
        mask = torch.ones_like(logp, dtype=torch.bool)
    elif not isinstance(mask, torch.Tensor) or mask.shape != logp.shape:
        raise ValueError(f"mask must be a tensor of logp's shape {tuple(logp.shape)}")
    kl_beta = _check_weight(kl_beta, "kl_beta")
    if kl_beta > 0:
        if kl is None:
            raise ValueError("kl_beta > 0 needs kl (umm_ops.flow_kl of the policy's and the reference's velocities)")
        _check_float(kl, "kl", 2)
        if kl.shape != logp.shape:
            raise ValueError(f"kl must have logp's shape {tuple(logp.shape)}, got {tuple(kl.shape)}")
    adv = advantages.to(logp.dtype)
    if adv_clip is not None:
        adv = adv.clamp(-_check_weight(adv_clip, "adv_clip"), adv_clip)
    m = mask.to(logp.dtype)
    pg, ratio, clipped = ppo_clip_objective(logp, old_logp.detach(), adv[:, None], clip)
    n = m.sum().clamp(min=1)
    loss = (pg * m).sum() / n
    if kl_beta > 0:
        loss = loss + kl_beta * (kl * m).sum() / n
    with torch.no_grad():
        sel = m > 0
        any_ = bool(sel.any())
        stats = {"pg_loss": float((pg * m).sum() / n),
                 "kl": float((kl * m).sum() / n) if kl is not None else 0.0,
                 "ratio_mean": float(ratio[sel].mean()) if any_ else 1.0,
                 "ratio_max": float(ratio[sel].max()) if any_ else 1.0,
                 "clip_frac": float(clipped[sel].float().mean()) if any_ else 0.0,
                 "steps": float(m.sum())}
    return loss, stats
