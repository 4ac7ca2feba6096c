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


@dataclass(frozen=True)
class Paired:
    """A condition against a reference on the same problems (both runs complete)."""

    n: int
    accuracy_diff: float  # condition minus reference, in points of accuracy (0.01 = 1 point)
    low: float  # 95% paired-bootstrap interval of the difference
    high: float
    mcnemar_p: float | None  # exact McNemar test on the discordant pairs
    disagree: int  # problems whose selected answer differs from the reference's
    disagree_bound: float  # one-sided 95% Clopper-Pearson upper bound on the disagreement rate
    induced_errors: int  # wrong here, right in the reference (the paper's "CGEE-induced errors")
    fixed: int  # right here, wrong in the reference


def paired(reference_correct: list[bool], correct: list[bool], same_answer: list[bool], resamples: int = 2000,
           seed: int = 0) -> Paired:
    ref, cond = np.asarray(reference_correct, float), np.asarray(correct, float)
    diff = cond - ref
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diff.size, size=(resamples, diff.size))
    low, high = np.percentile(diff[idx].mean(axis=1), [2.5, 97.5])
    induced = int(((ref == 1) & (cond == 0)).sum())
    fixed = int(((ref == 0) & (cond == 1)).sum())
    p = None
    if induced + fixed:
        from scipy.stats import binomtest

        p = float(binomtest(induced, induced + fixed, 0.5).pvalue)
    disagree = int(sum(not s for s in same_answer))
    from scipy.stats import beta

    bound = 1.0 if disagree >= diff.size else float(beta.ppf(0.95, disagree + 1, diff.size - disagree))
    return Paired(int(diff.size), float(diff.mean()), float(low), float(high), p, disagree, bound, induced, fixed)
