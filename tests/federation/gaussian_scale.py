"""A two-sided test that observed noise has the standard deviation a ledger claims.

Under the claim, n independent N(0, s^2) draws give sum(x^2) / s^2 ~ chi^2(n) exactly (the mean
is known to be 0), so the ratio rms / s lies in the band below except with probability
FALSE_FAILURE. Each test also shows its power: the same band must reject half and twice the
claimed scale for its sample size.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import chi2

FALSE_FAILURE = 1e-6


def ratio_band(n: int) -> tuple[float, float]:
    """The range of rms / claimed sd accepted for n draws."""
    low = chi2.ppf(FALSE_FAILURE / 2, n)
    high = chi2.isf(FALSE_FAILURE / 2, n)
    return math.sqrt(low / n), math.sqrt(high / n)


def has_scale(noise: np.ndarray, claimed_sd: float) -> bool:
    draws = np.asarray(noise, dtype=np.float64).ravel()
    low, high = ratio_band(draws.size)
    rms = math.sqrt(float(np.mean(draws**2)))
    return low <= rms / claimed_sd <= high


def assert_scale(noise: np.ndarray, claimed_sd: float) -> None:
    """The noise matches the claim, and the test could tell half or twice the claim apart."""
    draws = np.asarray(noise, dtype=np.float64).ravel()
    rms = math.sqrt(float(np.mean(draws**2)))
    assert has_scale(draws, claimed_sd), (
        f"{draws.size} noise draws have rms {rms:.4g}, the claim is {claimed_sd:.4g} "
        f"(accepted ratio {ratio_band(draws.size)})"
    )
    for wrong in (0.5, 2.0):  # the sample is large enough to have power
        assert not has_scale(draws, wrong * claimed_sd)
