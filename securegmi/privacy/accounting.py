"""Epsilon of a sequence of events: PLD (primary) and RDP (cross-check), both dp-accounting.

The primary figure is dp-accounting's privacy-loss-distribution (PLD) accountant with pessimistic
discretisation: a valid upper bound, and tighter than RDP's conversion (the default plan at
epsilon 8 by RDP spends 7.43 by PLD). RDP stays as an independent cross-check; for a plan
calibrated on PLD it reads above the budget, which is the looseness of RDP, not an overspend.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter
from collections.abc import Iterable
from enum import StrEnum

import dp_accounting
import numpy as np
from dp_accounting.pld import privacy_loss_distribution
from dp_accounting.rdp import rdp_privacy_accountant

# dp-accounting's RDP code logs convergence warnings for some small orders through absl; they
# are expected and not actionable by a user.
logging.getLogger("absl").setLevel(logging.ERROR)

ADJACENCY = "add-or-remove-one record (Poisson subsampling amplification holds for this relation)"
_RELATION = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


class Accountant(StrEnum):
    """Which accountant a figure (a plan's calibration, a ledger's `spent`) is by."""

    PLD = "pld"
    RDP = "rdp"


PRIMARY = Accountant.PLD

# The PLD's privacy-loss grid. Discretisation is pessimistic, so any interval gives an upper
# bound; 1e-3 instead of dp-accounting's 1e-4 moves the default plan's epsilon 8 by 4e-6 and
# makes each evaluation ~10x cheaper (the ledger re-accounts its history before every round).
PLD_DISCRETIZATION = 1e-3

# Integer RDP orders only. At fractional orders dp-accounting 0.6.0 and Opacus 1.6.0 disagree
# for the subsampled Gaussian (q=0.25, sigma=1.3, 120 steps, alpha=2.5: RDP 8.187 vs 7.981) and
# dp-accounting's series does not converge below alpha=1.8; at integer orders both are exact and
# equal. Dropping fractional orders can only loosen epsilon, never understate it.
RDP_ORDERS: tuple[int, ...] = (*range(2, 65), 128, 256, 512, 1024)


def rdp_accountant() -> dp_accounting.PrivacyAccountant:
    return rdp_privacy_accountant.RdpAccountant(orders=list(RDP_ORDERS), neighboring_relation=_RELATION)


def epsilon_of(events: Iterable[dp_accounting.DpEvent], delta: float, accountant: str = PRIMARY) -> float:
    """Epsilon at `delta` by the named accountant (`Accountant`)."""
    return epsilon_rdp(events, delta) if accountant == Accountant.RDP else epsilon_pld(events, delta)


def epsilon_rdp(events: Iterable[dp_accounting.DpEvent], delta: float) -> float:
    total = sum((_rdp_curve(event) for event in events), np.zeros(len(RDP_ORDERS)))
    epsilon, _ = rdp_privacy_accountant.compute_epsilon(RDP_ORDERS, total, delta)
    return float(epsilon)


def _rdp_curve(event: dp_accounting.DpEvent) -> np.ndarray:
    """The event's RDP at every order. RDP composes by addition, so a composition is the sum of
    its parts' curves, each computed once (`_base_curve`)."""
    if isinstance(event, dp_accounting.SelfComposedDpEvent):
        repeated: np.ndarray = int(event.count) * _rdp_curve(event.event)
        return repeated
    if isinstance(event, dp_accounting.ComposedDpEvent):
        composed: np.ndarray = sum((_rdp_curve(e) for e in event.events), np.zeros(len(RDP_ORDERS)))
        return composed
    return _base_curve(event)


@functools.lru_cache(maxsize=256)
def _base_curve(event: dp_accounting.DpEvent) -> np.ndarray:
    """dp-accounting's RDP curve of one event, cached: a ledger re-checks its whole history before
    every release, and the subsampled Gaussian's curve costs ~10 ms (a 100-step split DP-SGD run
    spent a third of its time here). dp-accounting has no public getter for the curve, so it is
    read from the accountant after composing that one event; `test_accounting` checks the sums
    against the accountant's own composition."""
    accountant = rdp_accountant()
    accountant.compose(event)
    curve = np.array(accountant._rdp, dtype=np.float64)
    curve.setflags(write=False)
    return curve


class PldAccountant(dp_accounting.PrivacyAccountant):  # type: ignore[misc]  # untyped base
    """dp-accounting's PLD accounting of FedGMI's events, composed in a canonical form.

    Every event reduces to plain Gaussian mechanisms and counts of Poisson-subsampled ones. The
    Gaussians compose exactly into one Gaussian with 1/sigma^2 = sum 1/sigma_i^2 (Dong, Roth &
    Su 2022, Cor. 3.3), whose PLD is built once; each subsampled Gaussian (q, sigma) is
    dp-accounting's PLD self-composed `count` times. A Poisson rate of 1 is the plain Gaussian.
    The PLDs and the epsilon are cached on that form, so that every client of a cohort (same
    plan, same ledger) and every round of a calibration search reuse them. Same figure as
    dp-accounting's `PLDAccountant` at the same discretisation, within its pessimistic rounding
    (`test_accounting`)."""

    def __init__(self) -> None:
        super().__init__(_RELATION)
        self._inverse_variance = 0.0  # sum of 1/sigma^2 over the plain Gaussians
        self._subsampled: Counter[tuple[float, float]] = Counter()  # (q, sigma) -> steps
        self._non_private = False

    def _maybe_compose(
        self, event: dp_accounting.DpEvent, count: int, do_compose: bool
    ) -> dp_accounting.PrivacyAccountant.CompositionErrorDetails | None:
        if isinstance(event, dp_accounting.NoOpDpEvent):
            return None
        if isinstance(event, dp_accounting.SelfComposedDpEvent):
            return self._maybe_compose(event.event, event.count * count, do_compose)
        if isinstance(event, dp_accounting.ComposedDpEvent):
            for e in event.events:
                if (error := self._maybe_compose(e, count, do_compose)) is not None:
                    return error
            return None
        sampled = isinstance(event, dp_accounting.PoissonSampledDpEvent)
        q, inner = (float(event.sampling_probability), event.event) if sampled else (1.0, event)
        if not isinstance(inner, dp_accounting.GaussianDpEvent):
            return self.CompositionErrorDetails(event, "only (Poisson-sampled) Gaussian mechanisms")
        sigma = float(inner.noise_multiplier)
        # Refused as dp-accounting's own accountants refuse them: a NaN multiplier would turn the
        # merged Gaussians' inverse variance into NaN and drop them all, a rate below 0 would
        # drop its steps (both found by a review: a forged plan then spent "nothing").
        if not (0 <= q <= 1 and math.isfinite(sigma) and sigma >= 0 and count >= 0):
            return self.CompositionErrorDetails(
                event, "a Poisson rate in [0, 1], a finite non-negative noise multiplier and count"
            )
        if do_compose and q > 0:
            if sigma == 0:
                self._non_private = True
            elif q == 1:
                self._inverse_variance += count / sigma**2
            else:
                self._subsampled[(q, sigma)] += count
        return None

    def get_epsilon(self, target_delta: float) -> float:
        if self._non_private:
            return math.inf
        return _pld_epsilon(self._inverse_variance, tuple(sorted(self._subsampled.items())), target_delta)


@functools.lru_cache(maxsize=1024)
def _pld_epsilon(
    inverse_variance: float, subsampled: tuple[tuple[tuple[float, float], int], ...], delta: float
) -> float:
    plds = [_subsampled_pld(q, sigma, steps) for (q, sigma), steps in subsampled]
    if inverse_variance > 0:
        plds.append(_gaussian_pld(1.0 / math.sqrt(inverse_variance)))
    if not plds:
        return 0.0
    total = functools.reduce(lambda a, b: a.compose(b), plds)
    return float(total.get_epsilon_for_delta(delta))


@functools.lru_cache(maxsize=64)
def _gaussian_pld(sigma: float) -> privacy_loss_distribution.PrivacyLossDistribution:
    return privacy_loss_distribution.from_gaussian_mechanism(
        sigma, value_discretization_interval=PLD_DISCRETIZATION, neighboring_relation=_RELATION
    )


@functools.lru_cache(maxsize=32)
def _subsampled_pld(q: float, sigma: float, steps: int) -> privacy_loss_distribution.PrivacyLossDistribution:
    return _subsampled_step(q, sigma).self_compose(steps)


@functools.lru_cache(maxsize=32)
def _subsampled_step(q: float, sigma: float) -> privacy_loss_distribution.PrivacyLossDistribution:
    return privacy_loss_distribution.from_gaussian_mechanism(
        sigma,
        sampling_prob=q,
        value_discretization_interval=PLD_DISCRETIZATION,
        neighboring_relation=_RELATION,
    )


def epsilon_pld(events: Iterable[dp_accounting.DpEvent], delta: float) -> float:
    accountant = PldAccountant()
    for event in events:
        accountant.compose(event)
    return accountant.get_epsilon(delta)
