"""Statistical audit of the count release: an empirical lower bound on epsilon from many trials
on worst-case neighbours must not exceed the claim, and a broken twin must be caught."""

from __future__ import annotations

import numpy as np

from securegmi.privacy.accounting import epsilon_pld
from securegmi.privacy.events import gaussian_event
from securegmi.privacy.mechanisms import gaussian_release

from .distinguisher import epsilon_lower_bound

DELTA = 1e-5
SIGMA = 1.0
TRIALS = 200_000
CONFIDENCE = 0.95
THRESHOLDS = np.linspace(-1.0, 6.0, 71)


def empirical_epsilon_lower_bound(noise_multiplier: float, seed: int) -> float:
    """Distinguish D (one extra record, r(x) = e_1, the worst case: ||r||_2 = 1) from D' by
    thresholding the released first count; bound FPR and FNR from above (Bonferroni over the
    thresholds and the two error types) and convert to epsilon at DELTA."""
    rng = np.random.default_rng(seed)
    counts_without = np.tile(np.array([12.0, 30.0, 7.0]), (TRIALS, 1))
    counts_with = counts_without + np.array([1.0, 0.0, 0.0])
    score_with = gaussian_release(counts_with, noise_multiplier, 1.0, rng)[:, 0] - 12.0
    score_without = gaussian_release(counts_without, noise_multiplier, 1.0, rng)[:, 0] - 12.0
    return epsilon_lower_bound(score_with, score_without, THRESHOLDS, DELTA, CONFIDENCE)


def test_count_release_meets_its_claim():
    claimed = epsilon_pld([gaussian_event(SIGMA)], DELTA)
    lower = empirical_epsilon_lower_bound(SIGMA, seed=1)
    assert 0.5 < lower <= claimed  # the test has power, and the claim holds


def test_a_broken_twin_with_a_tenth_of_the_noise_is_caught():
    claimed = epsilon_pld([gaussian_event(SIGMA)], DELTA)  # the same claim, as the twin makes it
    assert empirical_epsilon_lower_bound(0.1 * SIGMA, seed=2) > claimed
