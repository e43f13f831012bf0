"""The peers FedGMI is measured against behave as their papers say."""

from __future__ import annotations

import numpy as np
import pytest

from securegmi.config import SimulationConfig
from securegmi.core.gaussian_mixture import GaussianComponents, Moments
from securegmi.core.mixture import MixtureOfVAEs
from securegmi.data.datasets import synthetic_blobs
from securegmi.errors import ConfigError
from securegmi.federation.local import ClientSettings, LocalLearner
from securegmi.simulation.runner import run_simulation


def test_an_ifca_client_trains_only_the_one_component_of_lowest_loss():
    data = synthetic_blobs(per_class=40, seed=1)
    model = MixtureOfVAEs.mlp(3, data.x.shape[1], 16, 2, data.likelihood, seed=0)
    learner = LocalLearner("client-0", data.x, model, ClientSettings(local_epochs=1, assignment="cluster"), 0)
    best = int(learner.elbo().mean(0).argmax())
    before = model.get_component_vectors().copy()
    masses = learner.em_round(0, temperature=10.0)
    changed = np.abs(model.get_component_vectors() - before).max(axis=1) > 0
    assert changed.tolist() == [k == best for k in range(3)]
    assert masses[best] == len(data.x) and masses.sum() == len(data.x)
    assert int(np.argmax(learner.pi)) == best and learner.pi[best] > 0.99
    # The same learner under FedGMI's soft assignment trains every component.
    soft = LocalLearner(
        "client-0",
        data.x,
        MixtureOfVAEs.mlp(3, data.x.shape[1], 16, 2, data.likelihood, 0),
        ClientSettings(local_epochs=1),
        0,
    )
    before = soft.model.get_component_vectors().copy()
    soft.em_round(0, temperature=10.0)
    assert (np.abs(soft.model.get_component_vectors() - before).max(axis=1) > 0).all()


def test_clients_moments_add_up_to_the_pooled_moments_and_the_m_step_finds_the_means():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]])
    labels = rng.integers(0, 3, 600)
    x = centres[labels] + rng.normal(0, 0.5, (600, 2))
    resp = np.eye(3)[labels]
    parts = [Moments.of(x[i::4], resp[i::4]) for i in range(4)]
    total = parts[0] + parts[1] + parts[2] + parts[3]
    whole = Moments.of(x, resp)
    for a, b in ((total.counts, whole.counts), (total.sums, whole.sums), (total.outer, whole.outer)):
        np.testing.assert_allclose(a, b)
    fitted = GaussianComponents.from_moments(total, ridge=0.0)
    np.testing.assert_allclose(fitted.means, centres, atol=0.1)
    np.testing.assert_allclose(fitted.covariances[:, 0, 0], 0.25, atol=0.05)
    assert (fitted.log_likelihood(centres).argmax(1) == [0, 1, 2]).all()


def test_fedgmm_identifies_gaussian_sources():
    config = SimulationConfig(dataset="synthetic", clients=6, rounds=15, method="fedgmm")
    result = run_simulation(config)
    assert result.evaluation.source_accuracy > 0.9 and result.evaluation.nll is None
    assert result.uplink_bytes_per_client_round > 0


@pytest.mark.parametrize("method", ["ifca", "fedgmm"])
def test_the_peers_are_not_offered_under_dp(method):
    with pytest.raises(ConfigError, match="non-private peer"):
        SimulationConfig(method=method, protocol="dp", epsilon=4.0)
