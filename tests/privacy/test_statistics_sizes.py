"""The statistics design's sizes (fine clusters, projection dimensions, k-means rounds) are a
function of epsilon alone (issue 26: at epsilon 1 every release of 20 clusters in 10 dimensions is
mostly noise), chosen alike by `simulate`, by the front door and by the audit; a size set by hand
is the plan's."""

from __future__ import annotations

import itertools

import pytest

import securegmi
from securegmi.config import STATISTICS_SIZES, SimulationConfig, StatisticsSizes, statistics_sizes
from securegmi.privacy.calibration import PrivateMixturePlan
from securegmi.privacy.ledger import PrivacyBudget
from securegmi.records.audit import _configuration_problems
from securegmi.simulation.study import dp_plan, load_federated_data

# Either side of each band's edge in STATISTICS_SIZES.
EPSILONS = (1.0, 2.99, 3.0, 5.99, 6.0)


def _plan(config: SimulationConfig) -> PrivateMixturePlan:
    plan = dp_plan(config, load_federated_data(config))
    assert isinstance(plan, PrivateMixturePlan)
    return plan


def _dims(config: SimulationConfig, plan: PrivateMixturePlan) -> dict[str, int]:
    """What protocol.json binds that the audit checks against the plan: the histogram's width
    and the minimum cohort."""
    return {"H": config.clients * plan.statistics.clusters, "N": plan.statistics.min_clients}


def _sizes(plan: PrivateMixturePlan) -> StatisticsSizes:
    s = plan.statistics
    return StatisticsSizes(s.clusters, s.projection_dim, s.iterations)


@pytest.mark.parametrize("epsilon", EPSILONS)
def test_simulate_the_front_door_and_the_configuration_choose_the_same_sizes(epsilon):
    config = SimulationConfig(epsilon=epsilon, protocol="secure", samples_per_client=40)
    plan = _plan(config)
    assert _sizes(plan) == config.statistics_sizes == statistics_sizes(epsilon)
    # The run's length follows the sizes: the ledger admits exactly the planned rounds.
    assert config.planned_rounds == plan.rounds
    assert _configuration_problems(config, plan, _dims(config, plan)) == []
    front = securegmi.calibrate_statistics(PrivacyBudget(epsilon, 1e-5), clients=config.clients, features=64)
    assert _sizes(front) == statistics_sizes(epsilon)


def test_the_sizes_differ_between_budgets_and_grow_with_epsilon():
    """The control of the test above: a configuration or plan that ignored epsilon would meet
    the table at one band only."""
    chosen = [statistics_sizes(e) for e in EPSILONS]
    assert len(set(chosen)) == len(STATISTICS_SIZES) == 3
    assert all(all(a <= b for a, b in zip(lo, hi, strict=True)) for lo, hi in itertools.pairwise(chosen))
    assert statistics_sizes(8.0) == StatisticsSizes(20, 10, 4)  # the sizes every earlier run used


def test_a_size_set_by_hand_is_the_plan_s_and_the_rest_follow_epsilon():
    config = SimulationConfig(epsilon=1.0, protocol="secure", samples_per_client=40, fine_clusters=20)
    plan = _plan(config)
    assert _sizes(plan) == StatisticsSizes(20, 5, 2) == config.statistics_sizes  # 5 and 2: epsilon 1's
    assert config.planned_rounds == plan.rounds
    # An earlier run's config.json holds the sizes it ran with, and reads back with them and
    # writes them again, so its configuration digest (what resume checks) is unchanged.
    written = {**config.to_dict(), "fine_clusters": 20, "projection_dim": 10, "kmeans_iterations": 4}
    earlier = SimulationConfig.from_dict(written)
    assert earlier.statistics_sizes == StatisticsSizes(20, 10, 4)
    assert earlier.to_dict() == written


def test_the_audit_refuses_a_plan_whose_sizes_are_not_the_configuration_s():
    settings = {"epsilon": 1.0, "protocol": "secure", "samples_per_client": 40}
    config = SimulationConfig(**settings)
    other = _plan(SimulationConfig(**settings, kmeans_iterations=4))
    problems = _configuration_problems(config, other, _dims(config, other))
    assert any("kmeans_iterations" in p for p in problems), problems


@pytest.mark.parametrize("name", ["fine_clusters", "projection_dim", "kmeans_iterations"])
def test_a_size_below_one_is_refused(name):
    with pytest.raises(securegmi.ConfigError, match=name):
        SimulationConfig(epsilon=1.0, protocol="secure", **{name: 0})
