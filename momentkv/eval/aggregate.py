"""From per-step metrics to per-prompt values, means over prompts and 95% bootstrap confidence intervals.

Each prompt is one unit: its metric is the mean over its steps (all steps, or only the steps where
compression is active, from the first eviction on), and the intervals resample prompts with replacement
(percentile bootstrap, seeded), so long generations do not pass for many independent samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

BOOTSTRAP_SAMPLES = 2000


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float
    high: float
    n: int  # prompts that contributed

    def fmt(self, digits: int = 3) -> str:
        if math.isnan(self.mean):
            return "—"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def per_prompt_means(values: torch.Tensor, active_from: torch.Tensor | None = None) -> np.ndarray:
    """Mean of ``values`` ``(P, N)`` per prompt, over steps ``>= active_from[p]`` if given (NaN if none)."""
    v = values.double().cpu().numpy()
    if active_from is None:
        return v.mean(axis=1)
    steps = np.arange(v.shape[1])[None, :]
    keep = steps >= active_from.cpu().numpy()[:, None]
    counts = keep.sum(axis=1)
    sums = np.where(keep, v, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def bootstrap(per_prompt: np.ndarray, seed: int, samples: int = BOOTSTRAP_SAMPLES) -> Estimate:
    """Mean over prompts and its 95% percentile-bootstrap interval (prompts with NaN are left out)."""
    x = np.asarray(per_prompt, dtype=np.float64)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(samples, x.size))
    means = x[idx].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Estimate(float(x.mean()), float(low), float(high), int(x.size))


def paired_difference(a: np.ndarray, b: np.ndarray, seed: int) -> Estimate:
    """Mean of ``a - b`` over prompts that have both, with its bootstrap interval (the prompts are paired)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    both = ~(np.isnan(a) | np.isnan(b))
    return bootstrap(a[both] - b[both], seed)


@dataclass(frozen=True)
class PairedTest:
    """McNemar's exact test of two pass/fail outcomes on the same units."""

    only_a: int  # units ``a`` passes and ``b`` fails
    only_b: int
    n: int  # units with both outcomes
    p: float  # two-sided exact p-value (1.0 when no unit is discordant)

    def fmt(self) -> str:
        return f"{self.only_a}/{self.only_b}, p={self.p:.2g}" if self.n else "—"


def mcnemar(a: np.ndarray, b: np.ndarray) -> PairedTest:
    """McNemar's exact test of paired booleans ``a`` and ``b`` (NaN where a unit lacks one; left out).

    Under the null hypothesis that both pass equally often, each discordant unit is ``a``'s with probability 1/2,
    so the p-value is the two-sided binomial tail ``min(1, 2 P[X <= min(only_a, only_b)])``, ``X ~ Bin(d, 1/2)``
    with ``d`` the discordant units (McNemar 1947; the exact form, which small samples need).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    both = ~(np.isnan(a) | np.isnan(b))
    a, b = a[both] > 0.5, b[both] > 0.5
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    d = only_a + only_b
    if d == 0:
        return PairedTest(only_a, only_b, int(a.size), 1.0)
    tail = sum(math.comb(d, k) for k in range(min(only_a, only_b) + 1)) / 2.0 ** d
    return PairedTest(only_a, only_b, int(a.size), min(1.0, 2.0 * tail))


def relative_difference(a: np.ndarray, b: np.ndarray, seed: int, samples: int = BOOTSTRAP_SAMPLES) -> Estimate:
    """``mean(a) / mean(b) - 1`` over paired prompts, with a bootstrap interval resampling prompts jointly."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    both = ~(np.isnan(a) | np.isnan(b))
    a, b = a[both], b[both]
    if a.size == 0 or b.mean() == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), int(a.size))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(samples, a.size))
    ratios = a[idx].mean(axis=1) / np.maximum(b[idx].mean(axis=1), 1e-300) - 1.0
    low, high = np.percentile(ratios, [2.5, 97.5])
    return Estimate(float(a.mean() / b.mean() - 1.0), float(low), float(high), int(a.size))


def mean_curve(values: torch.Tensor) -> np.ndarray:
    """Mean over prompts at each step: ``(P, N)`` -> ``(N,)``."""
    return values.double().mean(dim=0).cpu().numpy()
