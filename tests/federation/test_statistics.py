"""The statistics design (docs/design.md §2): sensitivities, split-noise shares, fallback epsilon, the
minimum cohort, and an end-to-end private run that identifies its sources."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from securegmi.config import SimulationConfig
from securegmi.core import fine_clusters as fc
from securegmi.errors import ConfigError, RunAbortedError
from securegmi.federation.statistics import SENSITIVITY, StatisticsRole
from securegmi.privacy.calibration import PrivateMixturePlan, plan_from_dict
from securegmi.privacy.ledger import PrivacyBudget, PrivacyLedger
from securegmi.simulation.runner import run_simulation
from securegmi.simulation.study import Federation, dp_plan, load_federated_data
from securegmi.vocabulary import EventName
from tests.configs import private_config

from ..doubles import record_exact

SMALL = private_config("secure", clients=4)


def _plan(config: SimulationConfig = SMALL) -> PrivateMixturePlan:
    plan = dp_plan(config, load_federated_data(config))
    assert isinstance(plan, PrivateMixturePlan)
    return plan


def _role(x: np.ndarray, plan: PrivateMixturePlan, seed: int = 0) -> StatisticsRole:
    return StatisticsRole(x, plan.statistics, 3, 1, 4, 0, np.random.default_rng(seed))


def _drive(role: StatisticsRole, totals: list[np.ndarray]) -> list[np.ndarray]:
    """Every statistics round's pre-noise contribution on the shipped release path, fed the
    same released aggregates."""
    out = record_exact(role)
    for t in range(role.plan.rounds):
        role.absorb(t, None if t == 0 else totals[t - 1])
        role.contribution(t)
    assert len(out) == role.plan.rounds  # one exact value per release, seen on its way out
    return out


@pytest.mark.parametrize("position", [0, 17, 39, int(np.random.default_rng(5).integers(40))])
def test_neighbouring_datasets_move_every_statistics_release_by_at_most_its_sensitivity(position):
    """Over every round of the phase, D and D minus one record at any position (the same
    released aggregates fed to both) give contributions within the declared L2 sensitivity; a
    planted variant that skips the unit-sphere map exceeds it (negative control)."""
    plan = _plan()
    x = load_federated_data(SMALL).clients[0].x_train[:40].astype(np.float64)
    reference = _role(x, plan)
    totals = []
    for t in range(plan.statistics.rounds):  # public aggregates: a noisy run of the full set
        reference.absorb(t, None if t == 0 else totals[-1])
        totals.append(reference.contribution(t)[2] * 4)
    without = np.delete(x, position, axis=0)
    full, neighbour = _drive(_role(x, plan), totals), _drive(_role(without, plan), totals)
    releases = [plan.statistics.release_at(t) for t in range(plan.statistics.rounds)]
    assert releases == [
        EventName.MOMENTS,
        *[EventName.CLUSTERS] * plan.statistics.iterations,
        EventName.HISTOGRAM,
    ]
    for release, a, b in zip(releases, full, neighbour, strict=True):
        assert np.linalg.norm(a - b) <= SENSITIVITY[release] + 1e-9, release

    planted = _role(x * 10, plan)
    planted.u = x * 10 - plan.statistics.centre  # records without the unit-sphere map
    leaky = _role(without * 10, plan)
    leaky.u = without * 10 - plan.statistics.centre
    a, b = _drive(planted, totals)[0], _drive(leaky, totals)[0]
    assert np.linalg.norm(a - b) > SENSITIVITY[EventName.MOMENTS]


@pytest.mark.parametrize("placement", ["split", "local"])
def test_each_share_carries_the_planned_fraction_of_the_noise(placement):
    """The shipped release path, many times on fixed inputs: the standard deviation of one
    client's noise is sigma * sensitivity / sqrt(min_clients - 1) under split and the full
    sigma * sensitivity under local, so any min_clients - 1 shares (what a client that knows its
    own share sees) carry the full noise. Two-sided chi-square bound on the sample variance;
    false-failure rate below 1e-6 per test."""
    config = replace(SMALL, noise_placement=placement, min_clients=3, identifier_steps=None)
    plan = _plan(config)
    role = _role(load_federated_data(SMALL).clients[0].x_train[:30], plan, seed=11)
    exact = record_exact(role)
    draws = np.stack([role.contribution(0)[2] for _ in range(400)])
    noise = (draws - np.stack(exact)).ravel()
    expected = plan.statistics.moments_noise * SENSITIVITY[EventName.MOMENTS]
    if placement == "split":
        expected /= math.sqrt(3 - 1)
    # n = 400 x M values: the sample sd is within 1.5% of the truth except with prob < 1e-6.
    assert noise.size > 5000
    tolerance = 5.0 / math.sqrt(2 * noise.size)  # ~5 sigma of the sd's relative error
    assert abs(noise.std() / expected - 1) < tolerance
    # The same bound rejects a share of 1/sqrt(min_clients), which one curious client could
    # reduce to sqrt((N - 1) / N) of the noise by subtracting its own (the share before this).
    assert abs(noise.std() / (expected * math.sqrt(2 / 3)) - 1) > tolerance or placement == "local"


def test_split_noise_has_a_fallback_figure_and_local_noise_does_not():
    split, local = _plan(), _plan(replace(SMALL, noise_placement="local", identifier_steps=None))
    for plan in (split, local):
        ledger = PrivacyLedger("c", PrivacyBudget(plan.epsilon, plan.delta))
        ledger = ledger.check([e for r in range(plan.rounds) for e in plan.round_entries(r)])
        assert ledger.spent <= plan.epsilon * (1 + 1e-6)
        again = PrivacyLedger.from_json(ledger.to_json())  # the figure survives the file
        assert again.spent_fallback == pytest.approx(ledger.spent_fallback)
        if plan is split:
            assert ledger.split and ledger.spent_fallback > 1.5 * ledger.spent
        else:
            assert not ledger.split and ledger.spent_fallback == ledger.spent


def test_split_noise_is_refused_without_encryption():
    with pytest.raises(ConfigError, match="split noise"):
        replace(SMALL, protocol="dp", noise_placement="split")


@pytest.mark.parametrize("protocol", ["dp", "secure"])
def test_a_statistics_round_below_the_minimum_cohort_is_abandoned(protocol):
    """A sum of fewer shares than min_clients would be under-noised: the server refuses to
    form it. Negative control: the full cohort is added."""
    config = replace(SMALL, protocol=protocol, identifier_steps=None)
    federation = Federation.build(config)
    from securegmi.crypto.keys import SecretContext

    keys = SecretContext.generate(federation.ckks_parameters()) if federation.secure else None
    clients = [federation.client(i, keys) for i in range(config.clients)]
    server = federation.server(keys.public() if keys is not None else None)
    start = server.broadcast(0, 1.0)
    replies = {c.client_id: c.handle(start) for c in clients}
    with pytest.raises(RunAbortedError, match="minimum cohort"):
        server.aggregate(dict(list(replies.items())[:-1]))
    assert server.totals == {}  # no sum was formed
    assert server.aggregate(replies) == {}
    assert set(server.totals) == {"aggregate"}


@pytest.mark.slow
def test_a_private_run_identifies_sources_and_its_plan_spends_the_budget(tmp_path):
    """Synthetic sources separate by density, so the statistics alone must find them (8
    clients at epsilon 8 measured 0.996 and 0.905 on seeds 5 and 6)."""
    config = replace(SMALL, clients=8, epsilon=8.0)
    result = run_simulation(config, out=tmp_path / "run")
    assert result.evaluation.source_accuracy > 0.8
    assert result.privacy is not None
    assert 0.99 * 8.0 <= result.privacy["max_spent"] <= 8.0 * (1 + 1e-6)
    assert result.privacy["max_spent_fallback"] > result.privacy["max_spent"]
    from safetensors.numpy import load_file

    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert {"components", "pi", "stats.centroids", "stats.cluster_given_component"} <= set(saved)
    # Decrypted values leave on the release grid (Li-Micciancio), never as exact decryptions.
    grid = saved["stats.centroids"] / 1e-6
    assert np.allclose(grid, np.round(grid), atol=1e-3)


def test_the_grouping_recovers_a_planted_block_structure():
    """Clients x clusters counts generated from a known grouping: KL-NMF recovers which fine
    clusters belong together, and each client's pi."""
    rng = np.random.default_rng(0)
    p = np.zeros((2, 6))
    p[0, :3], p[1, 3:] = 1 / 3, 1 / 3
    pi = rng.dirichlet([0.5, 0.5], size=30)
    counts = np.stack([rng.multinomial(200, q @ p) for q in pi]).astype(float)
    g = fc.group_clusters(counts, 2, seed=0)
    order = np.argsort(g.cluster_given_component[:, 0])[::-1]  # component holding cluster 0 first
    assert np.allclose(g.cluster_given_component[order], p, atol=0.05)
    assert np.abs(g.pi[:, order] - pi).max() < 0.15


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"epsilon": 1e-9}, "too small to plan"),
        ({"epsilon": 1e6}, "too large to mean anything"),
        ({"delta": 0.5}, "not well below 1/n"),
        ({"epsilon": 1e-9, "private_training": "em", "noise_placement": "local"}, "too small to plan"),
    ],
)
def test_an_absurd_budget_is_one_clear_error(change, reason):
    """Never a traceback from the accountant: the planner says why and what range works."""
    config = replace(SMALL, **{"identifier_steps": None, **change})
    with pytest.raises(ConfigError, match=reason):
        dp_plan(config, load_federated_data(config))


def test_weighted_moments_read_back_as_the_unweighted_ones():
    """The weights only move sensitivity between the count, the sum and the second moments: the
    projection read back from exact weighted moments is the unweighted one. Negative control:
    reading them back with other weights gives another mean and basis."""
    u = fc.on_sphere(np.random.default_rng(3).random((50, 8)), 0.5)
    weighted = fc.moments_contribution(u, fc.MOMENTS_WEIGHTS)
    p = fc.Projection.from_moments(weighted, 8, 3, fc.MOMENTS_WEIGHTS)
    q = fc.Projection.from_moments(
        fc.moments_contribution(u, fc.UNWEIGHTED_MOMENTS), 8, 3, fc.UNWEIGHTED_MOMENTS
    )
    np.testing.assert_allclose(p.mean, q.mean, atol=1e-12)
    np.testing.assert_allclose(np.abs(p.basis.T @ q.basis), np.eye(3), atol=1e-8)
    wrong = fc.Projection.from_moments(weighted, 8, 3, fc.UNWEIGHTED_MOMENTS)
    assert not np.allclose(wrong.mean, q.mean, atol=1e-3)


@pytest.mark.parametrize(
    "weights",
    [
        (1.0, 1.0, 2.0),
        (0.0, 0.0, 1.8),
        (1.0, 1.0, 1.0 + 1e-6),  # just over the bound
        (0.0, 1.0, 1.0),  # a zero weight: nothing to read back
        (-1.0, 1.0, 1.0),
        (math.nan, 1.0, 1.0),
        ("1", "1", "1"),
        (True, True, True),
    ],
)
def test_moments_weights_beyond_the_sensitivity_are_refused(weights):
    """Every moments release is calibrated at sensitivity sqrt(3): weights whose squares sum to more
    would release the moments with less noise than the ledger records, so a plan (or a forged
    dp_plan.json) holding them is refused. The sensitivity test above is the control that the
    shipped weights keep a neighbour within sqrt(3); these would not."""
    plan = _plan().statistics
    assert replace(plan, moments_weights=fc.MOMENTS_WEIGHTS).moments_weights == fc.MOMENTS_WEIGHTS  # control
    with pytest.raises(ConfigError, match="moments weights"):
        replace(plan, moments_weights=weights)
    forged = {**_plan().to_dict()}
    forged["statistics"] = {**forged["statistics"], "moments_weights": list(weights)}
    with pytest.raises(ConfigError, match="moments weights"):
        plan_from_dict(forged)
    if all(isinstance(w, float) and w >= 0 for w in weights) and math.fsum(w * w for w in weights) > 3:
        u = np.eye(4)[[0, 1, 2, 3, 0]]  # one-hot records: the bound is attained
        moved = fc.moments_contribution(u, weights) - fc.moments_contribution(u[1:], weights)
        assert np.linalg.norm(moved) > fc.MOMENTS_SENSITIVITY  # what the refusal prevents


def test_a_plan_written_before_the_weights_reads_as_unweighted():
    old = _plan().to_dict()
    del old["statistics"]["moments_weights"]
    plan = plan_from_dict(old)
    assert isinstance(plan, PrivateMixturePlan)
    assert plan.statistics.moments_weights == fc.UNWEIGHTED_MOMENTS
    assert _plan().statistics.moments_weights == fc.MOMENTS_WEIGHTS  # control: new plans weigh


def test_soft_assignment_scores_by_nearby_clusters_and_old_models_score_hard():
    """A record's soft assignment weighs every fine cluster by its distance; at softness 0 (a model
    saved before soft assignment, which has no `stats.softness`) it is the nearest cluster's row,
    as that model was scored. Controls: the soft scores differ from the hard ones, and a saved
    model keeps its softness."""
    rng = np.random.default_rng(5)
    x = rng.random((40, 6))
    u = fc.on_sphere(x, 0.5)
    projection = fc.Projection.from_moments(fc.moments_contribution(u), 6, 3)
    table = rng.dirichlet(np.ones(7), size=2)
    model = fc.FineClusterModel(0.5, None, projection, fc.initial_centroids(7, 3, 1) * 3, table)
    z = projection(u)
    hard = np.log(table.T[fc.nearest(z, model.centroids)] + 1e-6)
    soft = model.log_likelihood(x)
    assert not np.allclose(soft, hard, atol=1e-3)
    assert (np.exp(soft) <= table.max(1)[None] + 2e-6).all()  # a weighted mean of each row
    old = {k: v for k, v in model.arrays().items() if k != "stats.softness"}
    np.testing.assert_array_equal(fc.FineClusterModel.from_arrays(old).log_likelihood(x), hard)
    again = fc.FineClusterModel.from_arrays(model.arrays())
    assert again.softness == fc.SOFT_ASSIGNMENT
    np.testing.assert_array_equal(again.log_likelihood(x), soft)


def test_the_moments_release_attains_its_sensitivity_on_worst_case_records():
    """On one-hot records (||triu(u u^T)|| = 1, the bound attained) the shipped release path moves
    by exactly sqrt(3) when a record is removed: a tight check, which a release weighing the
    second moments more than the plan's weights (a review's mutant: 2.11 against sqrt(3)) fails,
    where digit records (||triu(u u^T)||^2 about 0.5) would let it through."""
    plan = _plan()
    d = plan.statistics.sketch_dim
    records = np.eye(d)[[0, 1, 2, 3, 0, 2]]
    full, without = _role(records, plan), _role(records[1:], plan)
    full.u, without.u = records, records[1:]
    moved = np.linalg.norm(full.exact(0) - without.exact(0))
    assert abs(moved - fc.MOMENTS_SENSITIVITY) < 1e-9
    assert math.fsum(w * w for w in fc.MOMENTS_WEIGHTS) <= 3.0  # exactly, no slack


@pytest.mark.parametrize("softness", [1e-308, -1.0, 1e30, math.nan])
def test_a_saved_softness_outside_its_range_is_refused(softness):
    """A model file's softness is 0 or within [1e-6, 10]: 1e-308 made a third of the records score
    NaN, 1e30 every record the same (a review). Control: 1e-6, the sharpest allowed, scores every
    record finitely (the logits are shifted by each row's nearest cluster)."""
    rng = np.random.default_rng(2)
    x = rng.random((30, 6))
    u = fc.on_sphere(x, 0.5)
    model = fc.FineClusterModel(
        0.5,
        None,
        fc.Projection.from_moments(fc.moments_contribution(u), 6, 3),
        fc.initial_centroids(5, 3, 0) * 3,
        rng.dirichlet(np.ones(5), size=2),
        1e-6,
    )
    assert np.isfinite(fc.FineClusterModel.from_arrays(model.arrays()).log_likelihood(x)).all()
    forged = model.arrays() | {"stats.softness": np.asarray([softness])}
    with pytest.raises(ValueError, match="softness"):
        fc.FineClusterModel.from_arrays(forged)
