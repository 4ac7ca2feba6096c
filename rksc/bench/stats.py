"""Statistics for paired latency comparisons (numpy/scipy, no torch)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Speedup:
    ratio: float  # mean(baseline) / mean(condition)
    low: float  # 95% paired-bootstrap interval
    high: float
    p_value: float | None  # Wilcoxon signed-rank test on per-problem differences
    n: int


def speedup(baseline: list[float], condition: list[float], resamples: int = 2000, seed: int = 0) -> Speedup:
    """Ratio of mean latencies with a bootstrap interval that resamples problems (pairs kept)."""
    base, cond = np.asarray(baseline, float), np.asarray(condition, float)
    if base.shape != cond.shape or base.size == 0:
        raise ValueError("speedup needs two equally long, non-empty lists of paired latencies")
    ratio = base.mean() / cond.mean()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, base.size, size=(resamples, base.size))
    boot = base[idx].mean(axis=1) / cond[idx].mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return Speedup(float(ratio), float(low), float(high), paired_p_value(base, cond), int(base.size))


def paired_p_value(a, b) -> float | None:
    diff = np.asarray(a, float) - np.asarray(b, float)
    if diff.size < 2 or np.all(diff == 0):
        return None
    from scipy.stats import wilcoxon

    return float(wilcoxon(diff).pvalue)
