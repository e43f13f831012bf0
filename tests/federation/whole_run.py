"""Playing a federation's every round in this process, as the in-process engine does."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from securegmi.config import SimulationConfig
from securegmi.crypto.keys import SecretContext
from securegmi.federation.client import Client
from securegmi.federation.server import Server, play_round
from securegmi.federation.transport import InProcessTransport, Transport
from securegmi.simulation.study import Federation


def secure_federation(
    config: SimulationConfig,
) -> tuple[Federation, dict[str, Client], Server, InProcessTransport]:
    """A `secure` study's parties after the key ceremony, linked in this process."""
    federation = Federation.build(config)
    keys = SecretContext.generate(federation.ckks_parameters())
    clients = {cid: federation.client(i, keys) for i, cid in enumerate(federation.client_ids)}
    server = federation.server(keys.public())
    return federation, clients, server, InProcessTransport.linking(server, clients.values())


def play_to_the_end(
    federation: Federation, server: Server, transport: Transport, clients: Mapping[str, Any]
) -> None:
    """Every round, then each client takes in the final aggregate."""
    for t in range(federation.rounds):
        play_round(server, transport, list(clients), t, 1.0)
    final = server.broadcast(federation.rounds, 1.0)
    for client in clients.values():
        client.conclude(final)
