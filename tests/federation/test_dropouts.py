"""Dropouts: a client that fails mid-round is dropped from that round and the round completes
with the others if the stage's minimum cohort remains; otherwise nothing is added anywhere.
What a dropped client committed to its ledger before failing stays charged (write-ahead)."""

from __future__ import annotations

from typing import Any

import pytest

from securegmi.crypto.keys import SecretContext
from securegmi.errors import RunAbortedError
from securegmi.federation.server import play_round
from securegmi.federation.transport import InProcessTransport
from securegmi.simulation.study import Federation
from tests.configs import private_config

CONFIG = private_config(
    "secure", 8.0, clients=4, hidden=4, latent=1, min_clients=3, vae_rounds=1, kmeans_iterations=1
)


def _crash_in_release(client: Any) -> None:
    """Make the client fail after its ledger committed the round, while computing the release."""
    role = client.policy.statistics

    def crash(round_index: int) -> Any:
        raise RuntimeError("the site's process died")

    role.contribution = crash


def _federation() -> tuple[Federation, dict[str, Any], Any, InProcessTransport]:
    federation = Federation.build(CONFIG)
    keys = SecretContext.generate(federation.ckks_parameters())
    clients = {cid: federation.client(i, keys) for i, cid in enumerate(federation.client_ids)}
    server = federation.server(keys.public())
    transport = InProcessTransport.linking(server, clients.values())
    play_round(server, transport, list(clients), 0, 1.0)
    return federation, clients, server, transport


def test_a_client_that_fails_mid_round_is_dropped_and_the_minimum_cohort_completes_it():
    _, clients, server, transport = _federation()
    _crash_in_release(clients["client-3"])
    outcome = play_round(server, transport, list(clients), 1, 1.0)
    assert set(outcome.replies) == {"client-0", "client-1", "client-2"}
    # The class only: a site's error text stays with the site (it could hold private values).
    assert outcome.refused == {"client-3": "dropped out (RuntimeError)"}
    assert clients["client-3"].ledger.covers("clusters@round1")  # type: ignore[union-attr]
    assert server.aggregated == 1  # the three replies were added


def test_below_the_minimum_cohort_the_round_is_abandoned_and_nothing_is_added():
    _, clients, server, transport = _federation()
    before = dict(server.totals)
    for cid in ("client-2", "client-3"):
        _crash_in_release(clients[cid])
    with pytest.raises(RunAbortedError, match="minimum cohort is 3"):
        play_round(server, transport, list(clients), 1, 1.0)
    assert server.totals == before  # the ciphertext sums of round 0, untouched
    assert server.aggregated == 0  # round 1 was never added
