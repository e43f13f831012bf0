"""Noise scales on the shipped release paths: the noise each release actually adds, observed
on many releases of fixed inputs, has the standard deviation its ledger entry claims (noise
multiplier x sensitivity, and the per-client share where the noise is split). Two-sided
chi-square tests with a false-failure rate of 1e-6 each (`gaussian_scale`); DP-SGD's own noise
is checked in test_ledger_equals_mechanism and test_split_sgd."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from securegmi.crypto.keys import SecretContext
from securegmi.federation.release import CountsRelease, StatisticsRelease, fedgmi_downlink
from securegmi.federation.statistics import SENSITIVITY, StatisticsRole
from securegmi.privacy.calibration import PrivateMixturePlan
from securegmi.simulation.study import Federation
from tests.configs import private_config

from ..doubles import record_counts, record_exact
from .gaussian_scale import assert_scale
from .test_dropouts import CONFIG as DROPOUT_CONFIG

COUNT_ROUNDS = 120  # x K = 3 counts: 360 draws


def _event_multiplier(entry: dict[str, Any]) -> float:
    """The noise multiplier a ledger file's Gaussian event claims."""
    assert entry["event"]["type"] == "gaussian"
    return float(entry["event"]["noise_multiplier"])


def test_the_count_release_adds_the_noise_its_ledger_claims(tmp_path):
    """Every round of an em-design client (the shipped `CountsRelease.respond`: E-step, count
    release, DP-SGD), with the released counts observed where they are handed to the upload."""
    config = private_config(
        epsilon=8.0, rounds=COUNT_ROUNDS, hidden=4, latent=1, sample_rate=0.5, private_training="em"
    )
    federation = Federation.build(config)
    client = federation.client(0, None, tmp_path)
    policy = client.policy
    assert isinstance(policy, CountsRelease)
    learner, released, pre_noise = policy.learner, [], record_counts(policy)
    upload = learner.upload

    def observed_upload(noisy: np.ndarray) -> dict[str, np.ndarray]:
        released.append(np.array(noisy))
        return upload(noisy)

    learner.upload = observed_upload  # type: ignore[method-assign]
    temperature = {"temperature": np.array(1.0)}
    for t in range(COUNT_ROUNDS):
        policy.respond(t, fedgmi_downlink(t), temperature)
    ledger = json.loads((tmp_path / "client-0.json").read_text())
    claims = {_event_multiplier(e) for e in ledger["entries"] if e["name"] == "counts"}
    assert len(claims) == 1 and len(released) == len(pre_noise) == COUNT_ROUNDS
    # L2 sensitivity of the counts: 1 (release.CountsRelease).
    assert_scale(np.concatenate(released) - np.concatenate(pre_noise), claims.pop() * 1.0)


DRAWS = 400  # repeats of each statistics release: >= 400 x 3 draws


@pytest.mark.parametrize("placement", ["local", "split"])
def test_every_statistics_release_adds_the_noise_its_ledger_claims(placement):
    """Each release of the statistics phase (moments, cluster sums, histogram) repeated on a
    client's role, fed public aggregates of the shape the server sends. The claim is the ledger
    entry the client commits for that round. Under split placement each client adds a share:
    the entry's fallback figure (the share alone) names it, and the minimum cohort's shares
    together must carry the aggregate's full noise."""
    # 4 clients, cohort 3
    config = replace(DROPOUT_CONFIG, vae_rounds=5, noise_placement=placement, identifier_steps=None)
    federation = Federation.build(config)
    assert isinstance(federation.plan, PrivateMixturePlan)
    client = federation.client(1, SecretContext.generate(federation.ckks_parameters()))
    assert isinstance(client.policy, StatisticsRelease)
    role: StatisticsRole = client.policy.statistics
    stats = role.plan
    total = None  # round 0 has no aggregate; then a pooled noisy contribution, times the cohort
    for t in range(stats.rounds):
        role.absorb(t, total)
        (entry,) = federation.plan.round_entries(t)
        share = entry.fallback_event.noise_multiplier  # type: ignore[attr-defined]
        aggregate = entry.event.noise_multiplier  # type: ignore[attr-defined]
        assert share**2 * stats.min_clients >= aggregate**2 * (1 - 1e-12)
        noise, exact = [], record_exact(role)
        for _ in range(DRAWS):
            _, _, value = role.contribution(t)
            mine = value.reshape(4, -1)[1] if stats.release_at(t) == "histogram" else value
            noise.append(mine - exact[-1])
        assert_scale(np.concatenate(noise), share * SENSITIVITY[stats.release_at(t)])
        total = value * 4


def test_an_empty_dp_sgd_batch_still_releases_the_claimed_noise():
    """A Poisson sample may be empty; the step is then taken on a zero gradient sum plus the
    full noise, never skipped (skipping would reveal the empty batch). The noise Opacus leaves
    in the gradients (times the public normaliser) has sd noise multiplier x clipping norm."""
    import torch

    from securegmi.privacy.dpsgd import DpSgdConfig, PrivateTrainer

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(20, 50), torch.nn.Linear(50, 20))
    config = DpSgdConfig(noise_multiplier=1.5, clip_norm=2.0, sample_rate=0.5, batch_normaliser=8.0)
    trainer = PrivateTrainer(module, torch.optim.SGD(module.parameters(), lr=0.0), config)
    before = [p.detach().clone() for p in module.parameters()]

    def never_called(m: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        raise AssertionError("no record was sampled")

    trainer.step(never_called, torch.zeros(0, dtype=torch.long))
    noise = np.concatenate(
        [p.grad.detach().numpy().ravel() * config.batch_normaliser for p in module.parameters()]
    )
    assert_scale(noise, config.noise_multiplier * config.clip_norm)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))  # lr 0
