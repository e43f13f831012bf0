"""The RDP epsilon from cached per-event curves equals dp-accounting's own composition."""

from __future__ import annotations

import dp_accounting
import pytest

from securegmi.privacy.accounting import epsilon_rdp, rdp_accountant
from securegmi.privacy.events import dpsgd_event, gaussian_event

EVENTS = [
    [gaussian_event(1.4)],
    [dpsgd_event(1.1, 0.25, 100)],
    [gaussian_event(2.0), dpsgd_event(4.0, 0.25, 1), dpsgd_event(4.0, 0.25, 1), gaussian_event(1.3)],
    [dp_accounting.ComposedDpEvent([gaussian_event(3.0), dpsgd_event(0.9, 0.1, 7)]), gaussian_event(5.0)],
]


@pytest.mark.parametrize("events", EVENTS)
def test_cached_curves_compose_like_the_accountant(events):
    accountant = rdp_accountant()
    for event in events:
        accountant.compose(event)
    assert epsilon_rdp(events, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
    # Repeating a step costs epsilon: the cache keys on the event, never on the composition.
    assert epsilon_rdp([*events, dpsgd_event(1.0, 0.25, 1)], 1e-5) > epsilon_rdp(events, 1e-5)
