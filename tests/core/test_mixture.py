from __future__ import annotations

import numpy as np
import pytest
import torch

from securegmi.core.mixture import FusedMlpMixture, MixtureOfVAEs
from securegmi.core.training import train_components
from securegmi.core.vae import VAE
from securegmi.errors import ConfigError


def _separate(likelihood: str, seed: int = 0) -> MixtureOfVAEs:
    """The built-in mixture as K separate VAE.mlp modules, the fused layout's reference."""
    return MixtureOfVAEs.from_factory(lambda: VAE.mlp(16, 32, 4, likelihood), 3, seed)


def _same_draws(fn, model, *args):
    torch.manual_seed(1)
    with torch.no_grad():
        return fn(model)(*args)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_the_fused_mixture_is_the_separate_components_in_another_layout(likelihood):
    fused, separate = MixtureOfVAEs.mlp(3, 16, 32, 4, likelihood, seed=0), _separate(likelihood)
    assert type(fused) is FusedMlpMixture
    assert fused.parameter_count() == separate.parameter_count()
    # Same initialisation, flattened alike: the wire cannot tell the layouts apart.
    np.testing.assert_array_equal(fused.get_component_vectors(), separate.get_component_vectors())
    # Same maths, after any parameters are loaded: ELBO (one draw and several) and IWAE.
    vectors = np.random.default_rng(0).normal(0.0, 0.3, separate.get_component_vectors().shape)
    fused.set_component_vectors(vectors.astype(np.float32))
    separate.set_component_vectors(vectors.astype(np.float32))
    x = torch.rand(7, 16)
    for fn, args in [
        (lambda m: m.elbo_matrix, (x, 1)),
        (lambda m: m.elbo_matrix, (x, 4)),
        (lambda m: m.iwae_matrix, (x, 16)),
    ]:
        np.testing.assert_allclose(
            _same_draws(fn, fused, *args), _same_draws(fn, separate, *args), rtol=1e-5, atol=1e-5
        )
    # Negative control: the comparison sees a one-parameter difference in one component.
    vectors[2, -1] += 1.0  # an output bias of component 2
    separate.set_component_vectors(vectors.astype(np.float32))
    assert not np.allclose(
        _same_draws(lambda m: m.elbo_matrix, fused, x, 1),
        _same_draws(lambda m: m.elbo_matrix, separate, x, 1),
        atol=1e-5,
    )
    # A component handed out is a copy holding that component's parameters.
    copy = fused.component(1)
    np.testing.assert_array_equal(
        torch.nn.utils.parameters_to_vector(copy.parameters()).detach().numpy(),
        fused.get_component_vectors()[1],
    )


def test_the_fused_layout_refuses_components_it_cannot_hold():
    def other() -> VAE:
        vae = VAE.mlp(16, 32, 4, "bernoulli")
        vae.decoder = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16))
        return vae

    with pytest.raises(ConfigError, match="built-in"):
        FusedMlpMixture.from_factory(other, 2, seed=0)
    assert type(MixtureOfVAEs.from_factory(other, 2, seed=0)) is MixtureOfVAEs  # the general layout holds it


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
