"""Split-noise DP-SGD (`sgd_placement="split"`): one step per round, each client's clipped
gradient sum plus a share of the noise, encrypted; every client takes the same step with the
decrypted sum, as one curator would (privacy.calibration.PrivateMixturePlan)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from securegmi.errors import ConfigError, RunAbortedError
from securegmi.federation.server import play_round
from tests.configs import private_config

from ..doubles import record_shares
from .gaussian_scale import assert_scale, has_scale
from .whole_run import play_to_the_end, secure_federation

CONFIG = private_config(
    "secure",
    8.0,
    clients=4,
    hidden=8,
    min_clients=3,
    vae_rounds=1,
    kmeans_iterations=1,
    sgd_placement="split",
    identifier_steps=0,  # the VAEs' steps alone; the classifier's: test_distillation.py
)


@pytest.fixture(scope="module")
def finished():  # type: ignore[no-untyped-def]
    """A whole run, with each client's gradient shares and pre-noise sums observed."""
    federation, clients, server, transport = secure_federation(CONFIG)
    shares = {cid: record_shares(client.policy.trainer) for cid, client in clients.items()}  # type: ignore[attr-defined]
    play_to_the_end(federation, server, transport, clients)
    return federation, clients, shares


def test_one_step_per_round_and_every_client_ends_on_the_same_model(finished):
    federation, clients, shares = finished
    plan = federation.plan
    steps = plan.vae_rounds * plan.steps_per_round
    assert federation.rounds == plan.statistics.rounds + steps
    vectors = [c.components.get_component_vectors() for c in clients.values()]
    assert all(np.array_equal(v, vectors[0]) for v in vectors)  # one trajectory
    for cid, client in clients.items():
        entries = [e for e in client.ledger.entries if e.name == "dpsgd"]  # type: ignore[union-attr]
        assert len(entries) == steps == len(shares[cid])  # each step one ledger entry, one share
        assert all(e.fallback_json is not None for e in entries)
        assert 0.99 * 8.0 <= client.ledger.spent <= 8.0 * (1 + 1e-6)  # type: ignore[union-attr]


def _gaussian(event: Any) -> Any:
    """The Gaussian inside a (self-composed, Poisson-sampled) DP-SGD event."""
    while not hasattr(event, "noise_multiplier"):
        event = event.event
    return event


def test_each_share_carries_sigma_c_over_root_min_clients_less_one(finished):
    """Each client's share of a step's noise has sd sigma C / sqrt(min_clients - 1), sigma the
    multiplier of the ledger's event: any min_clients - 1 shares (all a client sees of the others
    once it subtracts its own) carry the whole step's noise. A chi-square test (false failure
    1e-6) that also rejects a much larger share and the sigma C / sqrt(min_clients) of before."""
    federation, clients, shares = finished
    noise = np.concatenate([released - pre for s in shares.values() for pre, released in s])
    ledger = next(iter(clients.values())).ledger
    (sigma,) = {_gaussian(e.event).noise_multiplier for e in ledger.entries if e.name == "dpsgd"}
    # Any min_clients - 1 shares carry the full noise (a client knows its own share).
    claimed = sigma * federation.plan.clip_norm / math.sqrt(max((CONFIG.min_clients or 1) - 1, 1))
    assert_scale(noise, claimed)
    assert not has_scale(noise, math.sqrt(CONFIG.min_clients or 1) * claimed)
    assert not has_scale(noise, claimed * math.sqrt(2 / 3))  # sigma C / sqrt(3): one client short


def test_a_step_with_fewer_than_min_clients_is_abandoned():
    federation, clients, server, transport = secure_federation(CONFIG)
    for t in range(federation.plan.statistics.rounds):
        play_round(server, transport, list(clients), t, 1.0)
    t = federation.plan.statistics.rounds
    replies = transport.exchange({cid: server.broadcast(t, 1.0) for cid in clients}).replies
    assert {m.stage for m in replies.values()} == {"gradient"}
    with pytest.raises(RunAbortedError, match="minimum cohort"):
        server.aggregate(dict(list(replies.items())[: CONFIG.min_clients - 1]))  # type: ignore[operator]
    assert server.aggregate(replies) == {}  # negative control: the whole cohort is added


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"protocol": "dp"}, "sound only when"),
        ({"private_training": "em"}, "sound only when"),
        ({"sgd_placement": "elsewhere"}, "sgd_placement"),
    ],
)
def test_split_sgd_is_refused_where_it_would_not_be_sound(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        replace(CONFIG, **kwargs)
