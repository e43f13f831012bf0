from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from securegmi.core.em import (
    fixed_point_pi,
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


def _em_step(scores: torch.Tensor, pi: np.ndarray, floor: float) -> np.ndarray:
    """One EM update of pi on frozen scores, from its definition."""
    r = responsibilities(scores, torch.log(torch.as_tensor(pi, dtype=torch.float64)))
    return mixture_estimate(r.sum(0).numpy(), floor)


def _log_likelihood(scores: torch.Tensor, pi: np.ndarray) -> float:
    return float(torch.logsumexp(scores + torch.log(torch.as_tensor(pi, dtype=torch.float64)), 1).sum())


@settings(max_examples=60, deadline=None)
@given(
    scores=arrays(np.float64, st.tuples(st.integers(1, 30), st.integers(1, 5)), elements=st.floats(-20, 20)),
    data=st.data(),
)
def test_fixed_point_pi_is_a_fixed_point_of_em_and_no_less_likely_than_its_start(scores, data):
    k = scores.shape[1]
    start = data.draw(arrays(np.float64, k, elements=st.floats(0.01, 1.0)))
    start = start / start.sum()
    s = torch.as_tensor(scores)
    pi = fixed_point_pi(s, start, 1e-3)  # a client's pi_floor
    assert abs(pi.sum() - 1.0) < 1e-12 and pi.min() > 0.5e-3
    assert np.abs(_em_step(s, pi, 1e-3) - pi).max() < 1e-6
    # EM never lowers the likelihood (with a floor too small to bind; towards a vertex it
    # creeps, so no fixed-point claim there).
    unfloored = fixed_point_pi(s, start, 1e-12)
    assert _log_likelihood(s, unfloored) >= _log_likelihood(s, start) - 1e-9 * len(s)


def test_fixed_point_pi_runs_to_convergence_not_to_a_count():
    """Two overlapping components (1 - 0.8 standard deviations apart): EM creeps, so a fixed
    count of 50 iterations (what estimate_pi once took) stops short of the fixed point."""
    rng = np.random.default_rng(0)
    n = 2000
    x = np.where(rng.random(n) < 0.7, rng.normal(0.0, 1.0, n), rng.normal(0.8, 1.0, n))
    s = torch.as_tensor(np.stack([-(x**2) / 2, -((x - 0.8) ** 2) / 2], 1))
    converged = fixed_point_pi(s, np.array([0.5, 0.5]), 1e-3)
    assert np.abs(_em_step(s, converged, 1e-3) - converged).max() < 1e-9
    short = fixed_point_pi(s, np.array([0.5, 0.5]), 1e-3, iterations=50)  # negative control
    assert np.abs(_em_step(s, short, 1e-3) - short).max() > 1e-6
    assert abs(converged[0] - 0.7) < 0.06  # the true share, within sampling error
