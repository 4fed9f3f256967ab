"""Rewards for online RL: callables on one finished trajectory returning a float, or (float, {name: float}) with
named parts for logging.  A trajectory is a dict: ``prompt``, ``meta`` (what the recipe knows about the prompt:
the checker's spec, the right answer, ...), ``text`` (the final text, if any) and ``image`` ((3, H, W) in [-1, 1],
the last generated image, if any), plus whatever the rollout adds (``restored``, ...).

Built in: :class:`PixelCheckReward` (the synthetic world's GenEval-like checker), :class:`AnswerReward` (exact /
multiple choice / numeric), :class:`FormatReward` (tags present and in order; CLEAR's 0.35 / 0.35 / 0.3),
:class:`DecisionReward` (CLEAR's table), :class:`MeanColorReward` (a reward a tiny model learns fast: tests and
demos), and :class:`WeightedReward` to combine them.
"""
from __future__ import annotations

import math
import re

import torch

__all__ = ["PixelCheckReward", "AnswerReward", "FormatReward", "DecisionReward", "MeanColorReward",
           "WeightedReward", "score", "extract_answer"]


def _split(out):
    if isinstance(out, tuple):
        value, parts = out
    else:
        value, parts = out, {}
    value = float(value)
    return value, dict(parts)


def score(reward, trajectories) -> tuple:
    """Apply ``reward`` to each trajectory -> (rewards (B,) float32, {part name: (B,) float32}).  A reward that is
    not a finite number is an error naming the trajectory (it would poison its whole group's advantages)."""
    vals, parts = [], {}
    for i, tr in enumerate(trajectories):
        v, p = _split(reward(tr))
        if not math.isfinite(v):
            raise ValueError(f"reward {reward!r} gave {v} for trajectory {i} (prompt {str(tr.get('prompt'))[:60]!r}):"
                             f" rewards must be finite")
        vals.append(v)
        for k, x in p.items():
            parts.setdefault(k, [float("nan")] * len(trajectories))[i] = float(x)
    return torch.tensor(vals, dtype=torch.float32), {k: torch.tensor(v) for k, v in parts.items()}


class PixelCheckReward:
    """The synthetic world's checker (:func:`umm_ops.eval.check`) on the generated image (pixels in
    ``value_range``: the model's profile's) against ``meta["spec"]``: the fraction of the prompt's constraints met
    (``strict``: 1 only when all are).  ``min_area``: the checker's; pass the world's ``min_object_area``, or noise
    fragments count as objects and a policy can be rewarded for confetti."""

    def __init__(self, strict: bool = False, value_range=(-1.0, 1.0), min_area: int | None = None):
        self.strict = bool(strict)
        self.min_area = min_area
        self.value_range = tuple(float(v) for v in value_range)     # the model's pixel range (its profile's)

    def __call__(self, tr):
        from ..eval.checker import check

        spec = tr["meta"].get("spec")
        if spec is None:
            raise KeyError("PixelCheckReward needs meta['spec'] (the prompt's checker spec) on each trajectory")
        r = check(spec, tr["image"], value_range=self.value_range, min_area=self.min_area)
        return (float(r["correct"]) if self.strict else r["score"]), {"checker_correct": float(r["correct"])}

    def __repr__(self):
        return f"PixelCheckReward(strict={self.strict}, min_area={self.min_area})"


_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


def extract_answer(text: str) -> str:
    """The text inside the last <answer>...</answer>, else the whole text; stripped."""
    hits = _ANSWER.findall(text)
    return (hits[-1] if hits else text).strip()


class AnswerReward:
    """1 when the answer matches ``meta["answer"]``, else 0.  mode "exact": case-insensitive equality after
    stripping spaces and a final period; "choice": the first option letter (A-Z) found equals the right one;
    "numeric": the first number found equals it within ``tol``."""

    MODES = ("exact", "choice", "numeric")

    def __init__(self, mode: str = "exact", tol: float = 1e-6):
        if mode not in self.MODES:
            raise ValueError(f"AnswerReward: mode must be one of {self.MODES}, got {mode!r}")
        self.mode, self.tol = mode, float(tol)

    def __call__(self, tr):
        want = str(tr["meta"]["answer"]).strip()
        got = extract_answer(tr.get("text") or "")
        if self.mode == "exact":
            ok = got.rstrip(".").strip().lower() == want.rstrip(".").strip().lower()
        elif self.mode == "choice":
            m = re.search(r"\b([A-Z])\b", got)
            ok = m is not None and m.group(1) == want.upper()
        else:
            m = re.search(r"-?\d+(?:\.\d+)?", got)
            ok = m is not None and abs(float(m.group(0)) - float(want)) <= self.tol
        return float(ok)

    def __repr__(self):
        return f"AnswerReward({self.mode!r})"


class FormatReward:
    """CLEAR's format reward: ``weights`` for each tag pair present (<think>...</think>, <answer>...</answer>) and
    ``order_weight`` when they appear in the given order (default 0.35, 0.35, 0.3)."""

    def __init__(self, tags=("think", "answer"), weights=(0.35, 0.35), order_weight: float = 0.3):
        if len(tags) != len(weights):
            raise ValueError(f"FormatReward: {len(weights)} weights for {len(tags)} tags")
        self.tags, self.weights, self.order_weight = tuple(tags), tuple(map(float, weights)), float(order_weight)

    def checks(self, text: str) -> dict:
        """{tag: its <tag>...</tag> pair is present, for each tag; "order": all present, in the given order}."""
        starts = {}
        for tag in self.tags:
            m = re.search(f"<{tag}>.*?</{tag}>", text, re.S)
            starts[tag] = m.start() if m else None
        s = [starts[t] for t in self.tags]
        return {**{t: v is not None for t, v in starts.items()},
                "order": all(v is not None for v in s) and s == sorted(s)}

    def total(self, checks: dict) -> float:
        """The reward of :meth:`checks`' result."""
        return sum(w for t, w in zip(self.tags, self.weights) if checks[t]) + self.order_weight * bool(checks["order"])

    def __call__(self, tr):
        c = self.checks(tr.get("text") or "")
        return self.total(c), {"format_ordered": float(c["order"])}


class DecisionReward:
    """CLEAR's decision reward: restored & correct 1.0, not restored & correct 0.6, restored & wrong 0.4, else
    -0.2.  ``restored``: whether the trajectory generated a restoration (``tr["restored"]``); correctness from
    ``correct`` (a reward callable, default AnswerReward("exact"), >= 0.5 counts as correct)."""

    TABLE = {(True, True): 1.0, (False, True): 0.6, (True, False): 0.4, (False, False): -0.2}

    def __init__(self, correct=None):
        self.correct = correct or AnswerReward("exact")

    def __call__(self, tr):
        ok = _split(self.correct(tr))[0] >= 0.5
        return self.TABLE[(bool(tr.get("restored", False)), ok)]


class MeanColorReward:
    """The mean of one colour channel minus the mean of the other two, over the image ((3, H, W) in [-1, 1]):
    "mean redness" for channel 0.  In [-2, 2]; a reward a tiny model learns within a few steps."""

    def __init__(self, channel: int = 0):
        if channel not in (0, 1, 2):
            raise ValueError(f"MeanColorReward: channel must be 0, 1 or 2, got {channel!r}")
        self.channel = channel

    def __call__(self, tr):
        img = tr["image"].float()
        others = [c for c in range(3) if c != self.channel]
        return float(img[self.channel].mean() - img[others].mean())


class WeightedReward:
    """sum of weight x reward over ``{name: (weight, reward)}``; each part is logged under its name."""

    def __init__(self, parts: dict):
        if not parts:
            raise ValueError("WeightedReward needs at least one {name: (weight, reward)}")
        for k, v in parts.items():
            if not (isinstance(v, tuple) and len(v) == 2 and callable(v[1])):
                raise ValueError(f"WeightedReward: part {k!r} must be (weight, callable), got {v!r}")
        self.parts = dict(parts)

    def __call__(self, tr):
        total, logs = 0.0, {}
        for name, (w, fn) in self.parts.items():
            v, sub = _split(fn(tr))
            total += float(w) * v
            logs[name] = v
            logs.update({f"{name}.{k}": x for k, x in sub.items()})
        return total, logs
