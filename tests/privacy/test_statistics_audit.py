"""Statistical audit of the statistics releases on the shipped path (`StatisticsRole`): worst-case
neighbours, many releases, an empirical epsilon lower bound that must stay below what the ledger
claims for one release, and a broken twin (a tenth of the noise, same claim) that is caught."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from securegmi.federation.statistics import SENSITIVITY, StatisticsRole
from securegmi.privacy.accounting import epsilon_pld
from securegmi.privacy.calibration import StatisticsPlan
from securegmi.privacy.events import gaussian_event
from securegmi.vocabulary import EventName

from .distinguisher import epsilon_lower_bound

DELTA = 1e-5
TRIALS = 20_000
CONFIDENCE = 0.95
THRESHOLDS = np.linspace(-1.0, 6.0, 36)
PLAN = StatisticsPlan(
    clusters=4,
    projection_dim=2,
    iterations=1,
    centre=0.0,
    sketch_dim=3,
    sketch_seed=0,
    placement="local",
    min_clients=1,
    moments_noise=1.0,
    cluster_noise=1.0,
    histogram_noise=1.0,
)
# Public aggregates fed to both neighbours: the moments of an isotropic cloud, then cluster
# totals that put the 4 centroids on the axes of the projection.
_MOMENTS = np.concatenate([[100.0], np.zeros(3), 100 / 3 * np.eye(3)[np.triu_indices(3)]])
_CLUSTERS = np.array([[5.0, 0, 10], [-5.0, 0, 10], [0, 5.0, 10], [0, -5.0, 10]]).ravel()


def _role(x: np.ndarray, plan: StatisticsPlan, seed: int) -> StatisticsRole:
    return StatisticsRole(x, plan, 2, 0, 1, 0, np.random.default_rng(seed))


def _scores(plan: StatisticsPlan, release: EventName, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Releases under D and D' projected on the unit difference the extra record makes, in
    units of the noise the ledger claims (noise multiplier 1 x sensitivity). The extra record
    lies on a coordinate axis, where the moments contribution reaches its sensitivity sqrt(3)."""
    base = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]])
    roles = [_role(np.vstack([base, [[1.0, 0.0, 0.0]]]), plan, seed), _role(base, plan, seed + 1)]
    t = {EventName.MOMENTS: 0, EventName.CLUSTERS: 1, EventName.HISTOGRAM: 2}[release]
    pre = []
    for role in roles:
        for r, total in enumerate((_MOMENTS, _CLUSTERS)[:t], start=1):
            role.absorb(r, total)
        pre.append(role.exact(t))  # what this round's mechanism adds its noise to
    direction = pre[0] - pre[1]
    assert np.linalg.norm(direction) >= 1.0  # a near worst-case pair: the test has power
    direction /= np.linalg.norm(direction)
    claimed_sigma = 1.0 * SENSITIVITY[release]
    scores = []
    for role in roles:
        draws = np.stack([role.contribution(t)[2] for _ in range(TRIALS)])
        scores.append((draws - pre[1]) @ direction / claimed_sigma)
    return scores[0], scores[1]


@pytest.mark.parametrize("release", [EventName.MOMENTS, EventName.CLUSTERS, EventName.HISTOGRAM])
def test_each_statistics_release_meets_its_claim_and_a_broken_twin_is_caught(release):
    claimed = epsilon_pld([gaussian_event(1.0)], DELTA)  # what the ledger records for one release
    lower = epsilon_lower_bound(*_scores(PLAN, release, seed=3), THRESHOLDS, DELTA, CONFIDENCE)
    assert 0.3 < lower <= claimed
    # The twin releases with a tenth of the noise while the ledger claims the same.
    broken = replace(PLAN, moments_noise=0.1, cluster_noise=0.1, histogram_noise=0.1)
    assert epsilon_lower_bound(*_scores(broken, release, seed=5), THRESHOLDS, DELTA, CONFIDENCE) > claimed
