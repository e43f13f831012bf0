"""Noise calibration from a whole-run budget: pure functions over dp-accounting's accountant.

The budget is split in a documented way: the R count releases alone may spend `count_share`
of epsilon; DP-SGD's noise is then calibrated so that counts and DP-SGD together spend exactly
the budget, composed by the RDP accountant (composition is what is bounded, not the shares).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import dp_accounting
from dp_accounting import mechanism_calibration

from securegmi.errors import ConfigError
from securegmi.privacy.accounting import epsilon_rdp, rdp_accountant
from securegmi.privacy.events import dpsgd_event, gaussian_event
from securegmi.privacy.ledger import LedgerEntry, PrivacyBudget

DPSGD = "dpsgd"
COUNTS = "counts"


@dataclass(frozen=True)
class DpPlan:
    """Everything the ledger will record, decided before the first round."""

    epsilon: float
    delta: float
    rounds: int
    steps_per_round: int
    sample_rate: float
    clip_norm: float
    count_share: float
    sgd_noise_multiplier: float
    count_noise_multiplier: float

    def round_entries(self, round_index: int) -> tuple[LedgerEntry, LedgerEntry]:
        """The two releases of one round: the soft counts, and the DP-SGD steps behind the
        uploaded components."""
        return (
            LedgerEntry.of(round_index, COUNTS, gaussian_event(self.count_noise_multiplier)),
            LedgerEntry.of(
                round_index,
                DPSGD,
                dpsgd_event(self.sgd_noise_multiplier, self.sample_rate, self.steps_per_round),
            ),
        )

    def planned_epsilon(self) -> float:
        events = [e.event for r in range(self.rounds) for e in self.round_entries(r)]
        return epsilon_rdp(events, self.delta)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _noise_for(events_of: Any, epsilon: float, delta: float) -> float:
    sigma = mechanism_calibration.calibrate_dp_mechanism(
        rdp_accountant,
        events_of,
        epsilon,
        delta,
        mechanism_calibration.LowerEndpointAndGuess(0.05, 1.0),
        tol=1e-4,
    )
    # Brent's method stops within tol of the boundary, on either side: step to the safe side.
    return float(sigma) + 1e-4


def calibrate(
    budget: PrivacyBudget,
    *,
    rounds: int,
    steps_per_round: int,
    sample_rate: float,
    clip_norm: float = 1.0,
    count_share: float = 0.2,
) -> DpPlan:
    """Noise multipliers that make `rounds` rounds spend at most `budget`."""
    if rounds < 1 or steps_per_round < 1:
        raise ConfigError("a DP plan needs at least one round and one DP-SGD step per round")
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if not 0 < count_share < 1:
        raise ConfigError(f"count_share must be in (0, 1), got {count_share}")
    count_sigma = _noise_for(
        lambda s: dp_accounting.SelfComposedDpEvent(gaussian_event(s), rounds),
        budget.epsilon * count_share,
        budget.delta,
    )
    sgd_sigma = _noise_for(
        lambda s: dp_accounting.ComposedDpEvent(
            [
                dp_accounting.SelfComposedDpEvent(gaussian_event(count_sigma), rounds),
                dpsgd_event(s, sample_rate, steps_per_round * rounds),
            ]
        ),
        budget.epsilon,
        budget.delta,
    )
    return DpPlan(
        epsilon=budget.epsilon,
        delta=budget.delta,
        rounds=rounds,
        steps_per_round=steps_per_round,
        sample_rate=sample_rate,
        clip_norm=clip_norm,
        count_share=count_share,
        sgd_noise_multiplier=sgd_sigma,
        count_noise_multiplier=count_sigma,
    )
