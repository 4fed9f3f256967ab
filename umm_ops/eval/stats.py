"""95% confidence intervals of evaluation scores.

    wilson(k, n)                       # a proportion k / n (exact-match accuracy, all-correct rate)
    bootstrap_mean(values, seed)       # the mean of scores in [0, 1] (checker score, IoU, caption score)
    summarize(values, method, seed)    # {"score", "ci95", "n", "ci_method"} for either

Wilson: the score interval of a binomial proportion, {p : (p_hat - p)^2 <= z^2 p (1 - p) / n}, i.e.
``(p_hat + z^2/2n -+ z sqrt(p_hat (1 - p_hat)/n + z^2/4n^2)) / (1 + z^2/n)``; unlike the normal approximation it
stays inside [0, 1] and is not empty at 0/n or n/n.  Bootstrap: the percentile interval of the mean over
``n_boot`` resamples with replacement, drawn from a numpy generator seeded through :func:`umm_ops.utils.seed_of`,
so the same values and seed give the same interval.
"""
from __future__ import annotations

import math

import numpy as np

from ..utils import seed_of

__all__ = ["Z95", "wilson", "bootstrap_mean", "summarize"]

Z95 = 1.959963984540054   # the 0.975 quantile of the standard normal


def wilson(k: int, n: int, z: float = Z95) -> tuple:
    """Wilson score interval (lo, hi) of k successes in n trials; (0.0, 1.0) when n == 0 (nothing is known)."""
    if isinstance(k, bool) or isinstance(n, bool) or int(k) != k or int(n) != n or not (0 <= k <= n):
        raise ValueError(f"wilson: need integers 0 <= k <= n, got k={k!r}, n={n!r}")
    k, n = int(k), int(n)
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    lo, hi = centre - half, centre + half
    # exact ends at 0/n and n/n (the formula gives them up to rounding)
    return (0.0 if k == 0 else max(0.0, lo), 1.0 if k == n else min(1.0, hi))


def bootstrap_mean(values, seed, n_boot: int = 2000, level: float = 0.95) -> tuple:
    """Percentile bootstrap interval (lo, hi) of the mean of `values`, seeded by `seed` (an int or a tuple of
    seed_of parts); (nan, nan) for no values."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"bootstrap_mean: expected a flat list of numbers, got shape {v.shape}")
    if v.size == 0:
        return (float("nan"), float("nan"))
    if not np.isfinite(v).all():
        raise ValueError("bootstrap_mean: values must be finite")
    if not (0.0 < level < 1.0) or n_boot < 1:
        raise ValueError(f"bootstrap_mean: need 0 < level < 1 and n_boot >= 1, got {level!r}, {n_boot!r}")
    parts = seed if isinstance(seed, tuple) else (seed,)
    rng = np.random.Generator(np.random.PCG64(seed_of(*parts, "bootstrap")))
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    a = (1.0 - level) / 2
    lo, hi = np.quantile(means, [a, 1.0 - a])
    return (float(lo), float(hi))


def summarize(values, method: str, seed=0) -> dict:
    """{"score": mean, "ci95": [lo, hi], "n", "ci_method"} of per-item values: method "wilson" (values 0 / 1) or
    "bootstrap" (values in [0, 1]); score and ci95 are None for no values."""
    v = [float(x) for x in values]
    n = len(v)
    if method == "wilson":
        if any(x not in (0.0, 1.0) for x in v):
            raise ValueError("summarize: the Wilson interval needs 0 / 1 values; use method='bootstrap'")
        k = int(sum(v))
        lo, hi = wilson(k, n)
    elif method == "bootstrap":
        lo, hi = bootstrap_mean(v, seed)
    else:
        raise ValueError(f"summarize: method must be 'wilson' or 'bootstrap', got {method!r}")
    if n == 0:
        return {"score": None, "ci95": None, "n": 0, "ci_method": method}
    return {"score": round(sum(v) / n, 6), "ci95": [round(lo, 6), round(hi, 6)], "n": n, "ci_method": method}
