"""The accountants against independent figures.

RDP: the epsilon from cached per-event curves equals dp-accounting's own composition.
PLD (the primary figure): for a composition of plain Gaussian mechanisms (the statistics phase;
DP-SGD at Poisson rate 1 is a plain Gaussian per step) the exact (epsilon, delta) curve is
analytic, and the ledger's figure must never be below it and be within a small tolerance of it;
with subsampling, it agrees with dp-accounting's own `PLDAccountant`.
"""

from __future__ import annotations

import math
from collections import Counter

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant, privacy_loss_distribution
from scipy import optimize, stats

from securegmi.privacy.accounting import PldAccountant, epsilon_pld, epsilon_rdp, rdp_accountant
from securegmi.privacy.events import dpsgd_event, gaussian_event

DELTA = 1e-5

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
    assert epsilon_rdp(events, DELTA) == pytest.approx(accountant.get_epsilon(DELTA), rel=1e-12)
    # Repeating a step costs epsilon: the cache keys on the event, never on the composition.
    assert epsilon_rdp([*events, dpsgd_event(1.0, 0.25, 1)], DELTA) > epsilon_rdp(events, DELTA)


def exact_gaussian_epsilon(sigmas: list[float], delta: float) -> float:
    """The exact epsilon at `delta` of Gaussian mechanisms (sensitivity 1, noise multipliers
    `sigmas`) composed: mu-GDP with mu = sqrt(sum 1/sigma_i^2) (Dong, Roth & Su 2022, Cor. 3.3),
    delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Balle & Wang 2018, Thm. 8),
    decreasing in eps, solved for eps."""
    mu = math.sqrt(sum(1 / s**2 for s in sigmas))

    def gap(eps: float) -> float:
        tail = stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)
        return float(tail) - delta

    return float(optimize.brentq(gap, 0.0, 500.0, xtol=1e-12))


# The statistics phase at epsilon 8 and 1 (moments, 4 k-means releases, histogram), the same
# with 5 full-batch DP-GD steps, one strong and one weak release.
STATISTICS_8 = [1.310, *[1.954] * 4, 1.196]
GAUSSIAN_RUNS = [STATISTICS_8, [8.21, *[12.24] * 4, 7.50], [*STATISTICS_8, *[3.35] * 5], [0.6], [30.0] * 3]
TOLERANCE = 1e-3  # relative: the pessimistic discretisation's slack (measured below 1e-4)


def _tight_upper_bound(figure: float, exact: float) -> bool:
    """The accountant's contract: never below the exact epsilon, and not much above it."""
    return exact * (1 - 1e-9) <= figure <= exact * (1 + TOLERANCE)


def _as_events(sigmas: list[float], full_batch_steps: int = 0) -> list[dp_accounting.DpEvent]:
    """The releases as the ledger folds them: repeated ones self-composed, the last
    `full_batch_steps` as DP-SGD steps at Poisson rate 1."""
    releases, steps = sigmas[: len(sigmas) - full_batch_steps], sigmas[len(sigmas) - full_batch_steps :]
    events = [
        gaussian_event(s) if n == 1 else dp_accounting.SelfComposedDpEvent(gaussian_event(s), n)
        for s, n in Counter(releases).items()
    ]
    return events + ([dpsgd_event(steps[0], 1.0, len(steps))] if steps else [])


@pytest.mark.parametrize("sigmas", GAUSSIAN_RUNS)
def test_pld_never_understates_the_exact_gaussian_epsilon_and_rdp_is_looser(sigmas):
    exact = exact_gaussian_epsilon(sigmas, DELTA)
    steps = 5 if len(sigmas) == 11 else 0  # the run with DP-GD steps, recorded as DP-SGD at rate 1
    events = _as_events(sigmas, steps)
    pld = epsilon_pld(events, DELTA)
    assert _tight_upper_bound(pld, exact)
    assert epsilon_rdp(events, DELTA) >= pld


def test_the_check_catches_optimistic_accountants():
    """Negative controls: three broken variants the contract above must reject."""
    sigmas = STATISTICS_8
    exact = exact_gaussian_epsilon(sigmas, DELTA)
    mu_sigma = 1 / math.sqrt(sum(1 / s**2 for s in sigmas))
    optimistic = privacy_loss_distribution.from_gaussian_mechanism(
        mu_sigma, value_discretization_interval=1e-2, pessimistic_estimate=False, use_connect_dots=False
    ).get_epsilon_for_delta(DELTA)
    broken = {
        "optimistic discretisation": optimistic,
        "noise overstated 1%": epsilon_pld([gaussian_event(1.01 * s) for s in sigmas], DELTA),
        "last release only": epsilon_pld([gaussian_event(sigmas[-1])], DELTA),
    }
    for name, figure in broken.items():
        assert figure < exact and not _tight_upper_bound(figure, exact), name
    # ... and the tolerance bites from above too: RDP's valid but loose figure is not "tight".
    assert not _tight_upper_bound(epsilon_rdp(_as_events(sigmas), DELTA), exact)


@pytest.mark.parametrize("events", EVENTS)
def test_pld_agrees_with_dp_accountings_own_accountant(events):
    """With Poisson subsampling there is no closed form: the canonical composition (Gaussians
    merged, per-(q, sigma) self-composition, coarser grid) must give dp-accounting's figure."""
    reference = pld_privacy_accountant.PLDAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    for event in events:
        reference.compose(event)
    ours = epsilon_pld(events, DELTA)
    assert ours == pytest.approx(reference.get_epsilon(DELTA), rel=TOLERANCE)
    assert ours <= epsilon_rdp(events, DELTA)
    # The caches key on the whole composition: one more step costs epsilon.
    assert epsilon_pld([*events, dpsgd_event(1.0, 0.25, 1)], DELTA) > ours


def test_the_pld_accountant_refuses_what_it_cannot_account():
    accountant = PldAccountant()
    assert not accountant.supports(dp_accounting.LaplaceDpEvent(1.0))
    assert accountant.supports(dp_accounting.ComposedDpEvent(EVENTS[3]))
    assert epsilon_pld([gaussian_event(0.0)], DELTA) == math.inf  # no noise: no guarantee


@pytest.mark.parametrize(
    "forged",
    [
        gaussian_event(float("nan")),  # NaN once turned every merged Gaussian's cost into nothing
        gaussian_event(float("inf")),
        gaussian_event(-1.0),
        dpsgd_event(0.01, -0.5, 100),  # a negative rate once dropped its steps
        dpsgd_event(0.01, 1.5, 100),
    ],
)
def test_an_event_no_mechanism_has_is_refused_not_counted_as_free(forged):
    """Found by a review: with the statistics' Gaussians beside a NaN one the hand-written
    accountant reported 0.0, where dp-accounting's own PLD accountant raises."""
    honest = [gaussian_event(0.3)] * 5
    assert epsilon_pld(honest, DELTA) > 10  # control: what the forged event would have hidden
    assert not PldAccountant().supports(forged)
    with pytest.raises(dp_accounting.UnsupportedEventError):
        epsilon_pld([*honest, forged], DELTA)
