"""What the mechanisms did, counted by observers independent of the ledger, equals what the
ledger records: DP-SGD steps, Poisson rate, noise multiplier and clipping norm (through the noise
Opacus actually added), and every statistics release. Runs the shipped client path of a whole
private run of the statistics design."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from securegmi.privacy.calibration import PrivateMixturePlan
from securegmi.simulation.study import Federation
from tests.configs import private_config

from .gaussian_scale import assert_scale

# Poisson batches (q < 1), so that the test below can check their membership rate.
CONFIG = private_config(sample_rate=0.25)


class Observer:
    """Watches one client's Opacus optimiser (its step hook runs after the noise is added and the
    sum scaled) and its Poisson sampler, and its statistics releases."""

    def __init__(self, client: Any) -> None:
        self.steps, self.sampled, self.noise = 0, 0, []
        self.noise_multipliers, self.clip_norms = set(), set()
        policy = client.policy
        trainer = policy.trainer
        self.n_records = len(policy.learner.x)
        sampler = trainer.poisson_batch

        def counted_batch(n: int) -> Any:
            batch = sampler(n)
            self.sampled += len(batch)
            return batch

        def hook(optimiser: Any) -> None:
            self.steps += 1
            self.noise_multipliers.add(optimiser.noise_multiplier)
            self.clip_norms.add(optimiser.max_grad_norm)
            for p in optimiser.params:  # the noise actually added: grad x divisor - clipped sum
                added = p.grad * optimiser.expected_batch_size - p.summed_grad
                self.noise.append(added.detach().numpy().ravel())

        trainer.poisson_batch = counted_batch
        trainer.optimiser.step_hook = hook
        self.releases: list[tuple[int, str]] = []
        role = policy.statistics
        contribution = role.contribution

        def counted_contribution(t: int) -> Any:
            self.releases.append((t, role.plan.release_at(t)))
            return contribution(t)

        role.contribution = counted_contribution


@pytest.fixture(scope="module")
def observed(tmp_path_factory):  # type: ignore[no-untyped-def]
    ledger_dir = tmp_path_factory.mktemp("ledgers")
    federation = Federation.build(CONFIG)
    clients = [federation.client(i, None, ledger_dir) for i in range(CONFIG.clients)]
    observer = Observer(clients[0])
    server = federation.server(None)
    for t in range(federation.rounds):
        replies = {c.client_id: c.handle(server.broadcast(t, 1.0)) for c in clients}
        server.aggregate(replies)
    ledger = json.loads((ledger_dir / "client-0.json").read_text())
    assert isinstance(federation.plan, PrivateMixturePlan)
    return observer, ledger, federation.plan


def _dpsgd_entries(ledger: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["event"] for e in ledger["entries"] if e["name"] == "dpsgd"]


def test_steps_rate_and_noise_multiplier_equal_the_ledger(observed):
    observer, ledger, plan = observed
    events = _dpsgd_entries(ledger)
    assert len(events) == plan.vae_rounds
    assert observer.steps == sum(e["count"] for e in events)
    rates = {e["event"]["sampling_probability"] for e in events}
    multipliers = {e["event"]["event"]["noise_multiplier"] for e in events}
    assert observer.noise_multipliers == multipliers and observer.clip_norms == {plan.clip_norm}
    # Poisson membership: the sampled count is Binomial(steps x n, q); 6 sd is a 2e-9 false alarm.
    (q,) = rates
    trials = observer.steps * observer.n_records
    assert abs(observer.sampled - q * trials) < 6 * math.sqrt(trials * q * (1 - q))


def test_the_noise_opacus_added_has_the_claimed_scale(observed):
    """sd of the added noise = noise multiplier x clipping norm of the ledger's event (a
    chi-square test, false failure 1e-6, with power against half and twice the claim)."""
    observer, ledger, plan = observed
    (multiplier,) = {e["event"]["event"]["noise_multiplier"] for e in _dpsgd_entries(ledger)}
    assert_scale(np.concatenate(observer.noise), multiplier * plan.clip_norm)


def test_every_statistics_release_is_one_ledger_entry(observed):
    observer, ledger, plan = observed
    on_ledger = [(e["round"], e["name"]) for e in ledger["entries"] if e["name"] != "dpsgd"]
    assert observer.releases == on_ledger
    assert len(on_ledger) == plan.statistics.rounds
