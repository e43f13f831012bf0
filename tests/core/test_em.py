from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from securegmi.core.em import (
    infer_mixture,
    mixture_estimate,
    project_to_simplex,
    responsibilities,
    temperature_at,
)

elbo_matrices = arrays(
    np.float32, st.tuples(st.integers(1, 8), st.integers(1, 5)), elements=st.floats(-5000, 5000, width=32)
)


@settings(max_examples=60, deadline=None)
@given(elbo=elbo_matrices, temperature=st.floats(1.0, 500.0), data=st.data())
def test_responsibilities_are_distributions_and_permutation_equivariant(elbo, temperature, data):
    k = elbo.shape[1]
    pi = data.draw(arrays(np.float64, k, elements=st.floats(0.01, 1.0)))
    pi = pi / pi.sum()
    perm = np.array(data.draw(st.permutations(range(k))))
    r = responsibilities(
        torch.as_tensor(elbo), torch.log(torch.as_tensor(pi, dtype=torch.float32)), temperature
    )
    assert torch.all(torch.isfinite(r))
    assert torch.allclose(r.sum(1), torch.ones(len(elbo)), atol=1e-5)
    r_perm = responsibilities(
        torch.as_tensor(elbo[:, perm]), torch.log(torch.as_tensor(pi[perm], dtype=torch.float32)), temperature
    )
    assert torch.allclose(r_perm, r[:, perm], atol=1e-5)


def test_prior_matters_only_when_tempered():
    # Two components 20 nats apart: at T=1 the prior (log 9 ~ 2.2 nats) cannot move the
    # responsibility; at T=10 it dominates. This is why the E-step anneals (docs/design.md §1).
    elbo = torch.tensor([[-100.0, -120.0]])
    prior = torch.log(torch.tensor([0.1, 0.9]))
    assert responsibilities(elbo, prior, 1.0)[0, 0] > 0.99
    assert responsibilities(elbo, prior, 10.0)[0, 0] < 0.6


def test_temperature_schedule_anneals_geometrically_to_one():
    ts = [temperature_at(t, 10, 10.0, 0.5) for t in range(10)]
    assert ts[0] == pytest.approx(10.0)
    assert all(a > b for a, b in itertools.pairwise(ts[:5]))
    assert ts[5:] == [1.0] * 5
    assert temperature_at(3, 10, 1.0, 0.5) == 1.0


@settings(max_examples=100, deadline=None)
@given(arrays(np.float64, st.integers(1, 10), elements=st.floats(-50, 50)))
def test_simplex_projection_is_a_projection(v):
    p = project_to_simplex(v)
    assert p.min() >= 0 and p.sum() == pytest.approx(1.0)
    assert project_to_simplex(p) == pytest.approx(p, abs=1e-9)  # idempotent on the simplex
    # It is the closest point: no random simplex point is closer.
    rng = np.random.default_rng(0)
    for q in rng.dirichlet(np.ones(v.size), size=20):
        assert np.linalg.norm(v - p) <= np.linalg.norm(v - q) + 1e-9


def test_mixture_estimate_floors_and_handles_negative_noise():
    pi = mixture_estimate(np.array([50.0, -3.0, 0.0]), floor=1e-3)
    assert pi.sum() == pytest.approx(1.0)
    assert pi.min() >= 1e-3 * 0.99
    assert pi[0] > 0.99


def test_infer_mixture_recovers_proportions_of_separable_data():
    # 70 samples clearly from component 0 and 30 from component 1.
    elbo = torch.tensor([[0.0, -50.0]] * 70 + [[-50.0, 0.0]] * 30)
    resp, masses, pi = infer_mixture(elbo, np.array([0.5, 0.5]), 1.0, 5, 1e-3)
    assert masses == pytest.approx([70.0, 30.0], abs=1e-3)
    assert pi == pytest.approx([0.7, 0.3], abs=1e-3)
    assert resp.shape == (100, 2)
