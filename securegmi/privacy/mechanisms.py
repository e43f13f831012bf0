"""The Gaussian mechanism as released by clients: one function, so that the mechanism audit
tests exactly what the client runs."""

from __future__ import annotations

import numpy as np


def gaussian_release(
    value: np.ndarray, noise_multiplier: float, sensitivity: float, rng: np.random.Generator
) -> np.ndarray:
    """value + N(0, (noise_multiplier * sensitivity)^2 I) (Dwork & Roth 2014, Thm A.1; the
    ledger accounts it with dp-accounting's GaussianDpEvent(noise_multiplier))."""
    noise: np.ndarray = rng.normal(0.0, noise_multiplier * sensitivity, size=np.shape(value))
    released: np.ndarray = np.asarray(value, dtype=np.float64) + noise
    return released
