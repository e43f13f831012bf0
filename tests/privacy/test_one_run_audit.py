"""The one-run empirical audit (Steinke et al. 2023): its bound is sound, and it catches a DP-SGD
whose noise is a tenth of what its ledger claims. The full figures are bench/one_run_audit.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from securegmi.core.em import mixture_loss
from securegmi.core.mixture import MixtureOfVAEs
from securegmi.data.datasets import load_dataset
from securegmi.privacy.accounting import epsilon_pld
from securegmi.privacy.auditing import audit_dp_sgd, empirical_epsilon
from securegmi.privacy.calibration import dp_sgd_noise
from securegmi.privacy.dpsgd import DpSgdConfig
from securegmi.privacy.events import dpsgd_event
from securegmi.privacy.ledger import PrivacyBudget
from securegmi.privacy.noise import NoiseSource

DELTA = 1e-5


def _randomised_response_bounds(epsilon: float, canaries: int, trials: int) -> np.ndarray:
    """The audit's bound on `trials` runs of epsilon-DP randomised response, which answers each
    canary's membership truthfully with probability e^eps / (1 + e^eps): the tightest
    epsilon-DP mechanism for this game."""
    rng = np.random.default_rng(0)
    truthful = 1.0 / (1.0 + math.exp(-epsilon))
    correct = rng.binomial(canaries, truthful, size=trials)
    return np.array([empirical_epsilon(canaries, canaries, int(v), DELTA) for v in correct])


def test_the_bound_exceeds_a_true_claim_at_most_as_often_as_its_confidence_allows():
    trials = 400
    honest = _randomised_response_bounds(1.0, 500, trials)
    # 95% confidence: at most 5% of runs above the truth, plus 3 standard errors of 400 trials.
    assert np.mean(honest > 1.0) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)
    assert np.median(honest) > 0.7  # and it is not vacuous: the bound sits near the truth
    # Negative control: randomised response at epsilon 2 is caught claiming 1 in most runs.
    assert np.mean(_randomised_response_bounds(2.0, 500, trials) > 1.0) > 0.9


def test_the_bound_is_zero_without_evidence_and_grows_with_correct_guesses():
    assert empirical_epsilon(1000, 100, 50, DELTA) == 0.0
    bounds = [empirical_epsilon(1000, 100, v, DELTA) for v in (60, 70, 80, 90, 100)]
    assert bounds == sorted(bounds) and bounds[0] < bounds[-1]
    # A larger delta explains more correct guesses away.
    assert empirical_epsilon(1000, 100, 100, 1e-2) < empirical_epsilon(1000, 100, 100, DELTA)


def _audit(noise_factor: float, claim: float, seed: int) -> tuple[float, float, int]:
    data = load_dataset("digits")
    x = torch.as_tensor(data.x[:100])
    q, steps, canaries = 0.25, 100, 1000
    sigma = dp_sgd_noise(PrivacyBudget(claim, DELTA), sample_rate=q, steps=steps)
    model = MixtureOfVAEs.mlp(3, x.shape[1], 32, 4, data.likelihood, seed=seed)
    resp = torch.full((len(x), 3), 1 / 3)
    torch.manual_seed(seed)
    audit = audit_dp_sgd(
        model,
        x,
        lambda out, idx: mixture_loss(out, resp[idx]),
        DpSgdConfig(sigma * noise_factor, 1.0, q, q * (len(x) + canaries / 2)),
        steps,
        canaries=canaries,
        guesses=50,
        delta=DELTA,
        learning_rate=1e-3,
        seed=seed,
        noise=NoiseSource(1000 + seed),
    )
    return epsilon_pld([dpsgd_event(sigma, q, steps)], DELTA), audit.empirical_epsilon, audit.correct


@pytest.mark.parametrize("seed", [3, 4])
def test_dp_sgd_stays_below_its_claim_and_a_twin_with_a_tenth_of_the_noise_does_not(seed):
    claim, honest, _ = _audit(1.0, 2.0, seed)
    assert claim == pytest.approx(2.0, rel=1e-3)
    assert honest < claim
    _, twin, correct = _audit(0.1, 2.0, seed)
    assert twin > claim and correct >= 95
