"""Epsilon of a sequence of events: RDP (primary) and PLD (cross-check), both dp-accounting."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable

import dp_accounting
import numpy as np
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

# dp-accounting's RDP code logs convergence warnings for some small orders through absl; they
# are expected and not actionable by a user.
logging.getLogger("absl").setLevel(logging.ERROR)

ADJACENCY = "add-or-remove-one record (Poisson subsampling amplification holds for this relation)"

# Integer RDP orders only. At fractional orders dp-accounting 0.6.0 and Opacus 1.6.0 disagree
# for the subsampled Gaussian (q=0.25, sigma=1.3, 120 steps, alpha=2.5: RDP 8.187 vs 7.981) and
# dp-accounting's series does not converge below alpha=1.8; at integer orders both are exact and
# equal. Dropping fractional orders can only loosen epsilon, never understate it; the PLD
# accountant is the tighter cross-check.
RDP_ORDERS: tuple[int, ...] = (*range(2, 65), 128, 256, 512, 1024)


def rdp_accountant() -> dp_accounting.PrivacyAccountant:
    return rdp_privacy_accountant.RdpAccountant(
        orders=list(RDP_ORDERS), neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    )


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


def epsilon_pld(events: Iterable[dp_accounting.DpEvent], delta: float) -> float:
    accountant = pld_privacy_accountant.PLDAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    for event in events:
        accountant.compose(event)
    return float(accountant.get_epsilon(delta))
