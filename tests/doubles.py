"""Test doubles that see the un-noised values a client's release path computes.

Production objects keep no un-noised value (a client's state, and anything a debugger or a
crash dump of it shows, holds releases only). A law test that needs the exact sum behind a
release wraps, on one object, the method that computes it: the shipped path still runs, and
each exact value is copied here as it passes to the Gaussian mechanism.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from securegmi.federation.release import CountsRelease
from securegmi.federation.statistics import StatisticsRole


def record_exact(role: StatisticsRole) -> list[np.ndarray]:
    """Every exact statistic `role` releases from now on (for the histogram, the client's own
    row), in order."""
    seen: list[np.ndarray] = []
    exact = role.exact

    def recorded(round_index: int) -> np.ndarray:
        value = exact(round_index)
        seen.append(np.array(value, copy=True))
        return value

    role.exact = recorded  # type: ignore[method-assign]
    return seen


def record_counts(policy: CountsRelease | Any) -> list[np.ndarray]:
    """Every exact soft-count vector sum_x r(x) `policy` (the em design's) releases from now
    on, in order."""
    if not isinstance(policy, CountsRelease):
        raise TypeError(f"a {type(policy).__name__} releases no soft counts")
    seen: list[np.ndarray] = []
    exact = policy.exact_counts

    def recorded(elbo: Tensor, temperature: float) -> np.ndarray:
        value = exact(elbo, temperature)
        seen.append(np.array(value, copy=True))
        return value

    policy.exact_counts = recorded  # type: ignore[method-assign]
    return seen
