"""Empirical epsilon lower bounds from a distinguishing experiment (shared by the mechanism
audits): threshold a scalar score of the release under D and under D', bound the false-positive
and false-negative rates from above (Clopper-Pearson, Bonferroni over thresholds and the two
error types) and convert to epsilon at delta."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import beta


def _upper(k: int, n: int, alpha: float) -> float:
    """One-sided Clopper-Pearson upper bound on a binomial proportion."""
    return 1.0 if k >= n else float(beta.ppf(1 - alpha, k + 1, n - k))


def epsilon_lower_bound(
    score_with: np.ndarray, score_without: np.ndarray, thresholds: np.ndarray, delta: float, confidence: float
) -> float:
    alpha = (1 - confidence) / (2 * len(thresholds))
    best = 0.0
    for t in thresholds:
        fpr = _upper(int(np.sum(score_without > t)), len(score_without), alpha)
        fnr = _upper(int(np.sum(score_with <= t)), len(score_with), alpha)
        for a, b in ((fnr, fpr), (fpr, fnr)):
            if 1 - delta - a > 0 and b > 0:
                best = max(best, math.log((1 - delta - a) / b))
    return best
