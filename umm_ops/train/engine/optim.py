"""Optimizer, learning-rate schedule and EMA of the weights.

* :func:`build_optimizer`: AdamW over the trainable parameters in two groups, weight decay on matrices only
  (parameters with >= 2 dims; biases, norms and gates without); PyTorch's fused kernel by default
  (``optim.implementation``).
* :class:`LRSchedule`: linear warmup to ``lr`` over ``warmup`` steps, then cosine / linear decay to
  ``min_lr_ratio * lr`` at ``steps``, or constant; stateful (``state_dict`` holds the step and the settings it was
  built with) and a pure function of the step, so a resumed run with a new ``lr`` or ``steps`` follows the new
  schedule from the step it resumes at.
* :class:`EMA`: ``ema = decay * ema + (1 - decay) * param`` after every optimizer step, in float32, on the same
  shards as the parameters (DTensor shards under FSDP2); saved with the checkpoint, exported with ``--ema``.
"""
from __future__ import annotations

import math

import torch

__all__ = ["build_optimizer", "LRSchedule", "EMA", "canonical_name", "named_trainable"]

# wrapper prefixes that DDP, activation checkpointing and torch.compile put into parameter names
_WRAPPERS = ("module.", "_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def canonical_name(name: str) -> str:
    """A parameter's name in the bare model (without the DDP / checkpoint-wrapper / compile prefixes)."""
    for w in _WRAPPERS:
        name = name.replace(w, "")
    return name


def named_trainable(model) -> list:
    """[(canonical name, parameter)] of the parameters that require grad, in the model's order."""
    return [(canonical_name(n), p) for n, p in model.named_parameters() if p.requires_grad]


# optim.implementation -> torch.optim.AdamW's keywords
IMPLEMENTATIONS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


def build_optimizer(model, ocfg) -> torch.optim.Optimizer:
    """AdamW with one parameter group per (lr scale, decay or not): ``optim.lr_scales`` ("prefix:scale", first
    matching prefix of the canonical name wins) gives a group ``lr_scale``, which :meth:`LRSchedule.apply`
    multiplies into the scheduled lr."""
    from ..config import parse_lr_scales

    params = named_trainable(model)
    if not params:
        raise ValueError("build_optimizer: the model has no parameter that requires grad")
    scales = parse_lr_scales(getattr(ocfg, "lr_scales", ()))
    unused = [f"{p}:{s}" for p, s in scales if not any(n.startswith(p) for n, _ in params)]
    if unused:
        raise ValueError(f"build_optimizer: optim.lr_scales {unused} match no trainable parameter (names look like "
                         f"{[n for n, _ in params[:3]]})")
    groups: dict = {}
    for n, p in params:
        scale = next((s for pre, s in scales if n.startswith(pre)), 1.0)
        decay = p.dim() >= 2
        g = groups.setdefault((scale, decay), {"params": [], "weight_decay": ocfg.weight_decay if decay else 0.0,
                                               "lr_scale": scale})
        g["params"].append(p)
    ordered = [groups[k] for k in sorted(groups, key=lambda k: (k[0] != 1.0, k[0], not k[1]))]
    impl = getattr(ocfg, "implementation", "fused")
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"build_optimizer: optim.implementation must be one of {list(IMPLEMENTATIONS)}, got {impl!r}")
    return torch.optim.AdamW(ordered, lr=ocfg.lr, betas=tuple(ocfg.betas), eps=ocfg.eps, **IMPLEMENTATIONS[impl])


class LRSchedule:
    def __init__(self, lr: float, steps: int, warmup: int, decay: str = "cosine", min_lr_ratio: float = 0.1):
        self.lr, self.steps, self.warmup, self.decay, self.min_lr_ratio = lr, steps, warmup, decay, min_lr_ratio
        self.step_count = 0

    @classmethod
    def from_config(cls, cfg) -> "LRSchedule":
        s = cfg.schedule
        return cls(cfg.optim.lr, cfg.job.steps, s.warmup, s.decay, s.min_lr_ratio)

    def lr_at(self, step: int) -> float:
        """The learning rate of (0-based) optimizer step `step`."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.decay == "constant":
            return self.lr
        span = max(1, self.steps - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        floor = self.lr * self.min_lr_ratio
        if self.decay == "linear":
            return self.lr + (floor - self.lr) * progress
        return floor + (self.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer, step: int) -> float:
        lr = self.lr_at(step)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        self.step_count = step + 1
        return lr

    def state_dict(self) -> dict:
        return {"step": self.step_count, "lr": self.lr, "steps": self.steps, "warmup": self.warmup,
                "decay": self.decay, "min_lr_ratio": self.min_lr_ratio}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step"])   # the settings come from the (possibly changed) config


class EMA:
    def __init__(self, model, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA: decay must be in (0, 1), got {decay!r}")
        self.decay = decay
        self.params = named_trainable(model)
        self.shadow = {n: p.detach().to(torch.float32, copy=True) for n, p in self.params}

    @torch.no_grad()
    def update(self) -> None:
        for n, p in self.params:
            self.shadow[n].lerp_(p.detach().to(torch.float32), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, state: dict) -> None:
        for n in self.shadow:
            if n not in state:
                raise KeyError(f"EMA.load_state_dict: the saved EMA lacks {n!r}")
            self.shadow[n].copy_(state[n])
