"""Epsilon of a sequence of events: RDP (primary) and PLD (cross-check), both dp-accounting."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import dp_accounting
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
    accountant = rdp_accountant()
    for event in events:
        accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def epsilon_pld(events: Iterable[dp_accounting.DpEvent], delta: float) -> float:
    accountant = pld_privacy_accountant.PLDAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    for event in events:
        accountant.compose(event)
    return float(accountant.get_epsilon(delta))
