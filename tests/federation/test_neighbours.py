"""The neighbour test over several rounds of the em design, including the rounds after the first
release, where a private quantity (a pi fitted to the data and never released, say) could
leak into what a client computes.

Adaptive composition (Dwork & Roth 2014, Thm 3.16) needs each round's mechanism to be a
function of the records and of what earlier rounds released. So for every round t >= 1:
1. a fresh client given only the state the ledger covers (the model DP-SGD produced, pi~ from
   the released counts, and the noise generator's position) reproduces round t of the running
   client bit for bit, so nothing else carried over;
2. the same fresh client on D minus one record differs from it only in declared DP releases,
   and its pre-noise counts move by at most their sensitivity 1.
Round 0 is tested in test_dp.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from securegmi.core.em import mixture_estimate
from securegmi.federation.client import Client
from securegmi.federation.release import CountsRelease
from securegmi.federation.server import Server
from securegmi.protocol import Message
from securegmi.simulation.study import Federation

from ..doubles import record_counts
from .test_dp import CONFIG as DP_CONFIG
from .test_dp import neighbour_violations

# The em design of test_dp, four rounds; the noise generators' positions are part of the covered
# state, so the noise is seeded.
CONFIG = replace(DP_CONFIG, rounds=4, hidden=8, dp_noise="seeded")


def _client(federation: Federation, x: np.ndarray) -> tuple[Client, list[np.ndarray]]:
    """Client 0's privacy plan and noise seed on records `x`, with its released counts observed
    where they are handed to the upload (before the upload's max(., 0) post-processing)."""
    template = federation.client(0, None)
    client = Client(
        "client-0",
        federation.new_model(),
        x,
        federation.spec,
        settings=template.learner.settings,
        privacy=template.policy.privacy,  # type: ignore[attr-defined]
        seed=CONFIG.seed,
    )
    released: list[np.ndarray] = []
    upload = client.learner.upload

    def observed(noisy: np.ndarray) -> dict[str, np.ndarray]:
        released.append(np.array(noisy))
        return upload(noisy)

    client.learner.upload = observed  # type: ignore[method-assign]
    return client, released


def _from_covered_state(federation: Federation, x: np.ndarray, running: Client, counts: np.ndarray) -> Client:
    """A fresh client on `x` holding only what the running client's ledger covers."""
    fresh, _ = _client(federation, x)
    policy, source = fresh.policy, running.policy
    assert isinstance(policy, CountsRelease) and isinstance(source, CountsRelease)
    arrays, metadata = source.state_arrays()  # the ledger and the noise generators' positions
    policy.load_state(arrays, metadata)
    fresh.learner.model.set_component_vectors(running.learner.model.get_component_vectors())
    fresh.learner.pi = mixture_estimate(counts, fresh.learner.settings.pi_floor)
    return fresh


def _fields(message: Message) -> dict[str, Any]:
    return {name: getattr(f, "value", None) for name, f in message.payload.items()}


@pytest.mark.slow
def test_every_round_depends_on_the_records_and_released_values_only():
    federation = Federation.build(CONFIG)
    x = federation.data.clients[0].x_train
    running, released = _client(federation, x)
    server = Server(federation.spec)
    server.aggregate({"client-0": running.handle(server.broadcast(0, 1.0))})
    for t in range(1, CONFIG.rounds):
        broadcast = server.broadcast(t, 1.0)
        twin = _from_covered_state(federation, x, running, released[-1])
        neighbour = _from_covered_state(federation, x[:-1], running, released[-1])
        exact_twin, exact_neighbour = record_counts(twin.policy), record_counts(neighbour.policy)
        on_twin, on_neighbour = twin.handle(broadcast), neighbour.handle(broadcast)
        on_running = running.handle(broadcast)
        for name, value in _fields(on_running).items():
            assert np.array_equal(value, _fields(on_twin)[name]), f"round {t}: {name} used uncovered state"
        assert neighbour_violations(federation.spec, on_twin, on_neighbour) == []
        (counts_twin,), (counts_neighbour,) = exact_twin, exact_neighbour
        assert 0 < np.linalg.norm(counts_twin - counts_neighbour) <= 1.0 + 1e-6, f"round {t}"
        server.aggregate({"client-0": on_running})
