from __future__ import annotations

import numpy as np
import pytest
import torch

from securegmi.core.mixture import MixtureOfVAEs
from securegmi.core.training import train_components


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_elbo_matrix_shape_and_vector_roundtrip(likelihood):
    model = MixtureOfVAEs.mlp(3, 16, 32, 4, likelihood, seed=0)
    x = torch.rand(5, 16)
    assert model.elbo_matrix(x).shape == (5, 3)
    vectors = model.get_component_vectors()
    assert vectors.shape == (3, model.parameter_count())
    other = MixtureOfVAEs.mlp(3, 16, 32, 4, likelihood, seed=1)
    assert not np.allclose(other.get_component_vectors(), vectors)
    other.set_component_vectors(vectors)
    assert np.array_equal(other.get_component_vectors(), vectors)
    with pytest.raises(ValueError, match="shape"):
        other.set_component_vectors(vectors[:2])


def test_components_start_distinct_and_seed_is_public():
    a = MixtureOfVAEs.mlp(3, 8, 16, 2, "bernoulli", seed=5).get_component_vectors()
    b = MixtureOfVAEs.mlp(3, 8, 16, 2, "bernoulli", seed=5).get_component_vectors()
    assert np.array_equal(a, b)  # every party rebuilds the same initialisation
    assert not np.allclose(a[0], a[1])  # and it breaks the symmetry between components


def test_iwae_is_tighter_than_elbo_on_average():
    torch.manual_seed(0)
    model = MixtureOfVAEs.mlp(1, 16, 32, 4, "bernoulli", seed=0)
    x = (torch.rand(64, 16) > 0.5).float()
    with torch.no_grad():
        elbo = model.elbo_matrix(x, samples=64).mean()
        iwae = model.iwae_matrix(x, samples=64).mean()
    assert iwae > elbo


def test_training_on_responsibilities_moves_only_the_responsible_component():
    model = MixtureOfVAEs.mlp(2, 8, 16, 2, "bernoulli", seed=0)
    before = model.get_component_vectors()
    x = np.random.default_rng(0).random((40, 8)).astype(np.float32)
    resp = torch.tensor([[1.0, 0.0]] * 40)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_components(model, x, resp, optimiser, epochs=2, batch_size=8, generator=np.random.default_rng(0))
    after = model.get_component_vectors()
    assert not np.allclose(before[0], after[0])
    assert np.array_equal(before[1], after[1])  # zero responsibility: zero gradient, Adam idle
