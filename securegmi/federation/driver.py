"""`run_federation`: the protocol's schedule played in this process for clients and a server
you built yourself (your components, your records, your plan), ending with the final aggregate.

It adds no round logic of its own: each round is `play_round` over an `InProcessTransport`, as
`securegmi simulate` plays it, so every message is checked at both ends and recorded on the
server's transcript. A deployment that carries bytes over its own wire plays the same rounds
with its own `Transport`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from securegmi.core.em import temperature_at
from securegmi.errors import ConfigError
from securegmi.federation.client import Client
from securegmi.federation.server import RoundOutcome, Server, play_round
from securegmi.federation.transport import InProcessTransport, Transport

RoundCallback = Callable[[int, RoundOutcome], None]


@dataclass(frozen=True)
class FederationRun:
    """What a federation played: its rounds and, per round, what each party refused."""

    rounds: int
    outcomes: tuple[RoundOutcome, ...]

    @property
    def uplink_bytes(self) -> int:
        return sum(o.uplink_bytes for o in self.outcomes)


def run_federation(
    clients: Sequence[Client],
    server: Server,
    *,
    rounds: int | None = None,
    temperature: float = 10.0,
    anneal_fraction: float = 0.5,
    transport: Transport | None = None,
    progress: RoundCallback | None = None,
) -> FederationRun:
    """Play every round of the protocol, then hand each client the final aggregate (`conclude`),
    so that every client's `components` is the federation's final model.

    A private run's length is its plan's (`rounds` may be omitted, or must agree); a plain run
    needs `rounds`. `temperature` is the initial likelihood temperature, annealed geometrically
    to 1 over `anneal_fraction` of the rounds (about 10 for 64 features, a few hundred for 784;
    1 turns it off); the statistics design does not read it. `transport` defaults to an
    in-process one; `progress(round, outcome)` is called after each round. The server's
    transcript is closed at the end: save the run with `securegmi.save`."""
    by_id = {c.client_id: c for c in clients}
    if not by_id:
        raise ConfigError("a federation needs at least one client")
    if len(by_id) != len(clients):
        raise ConfigError("two clients share an id: every site needs its own client_id")
    if any(c.spec != server.spec for c in clients):
        raise ConfigError("the clients and the server are bound to different protocols: bind one for all")
    if server.round is not None:
        # Its rounds are spent (its transcript closed): a second pass would replay round 0
        # against clients whose ledgers already hold it.
        raise ConfigError(
            f"this server has already played up to round {server.round}: a federation runs once; "
            "build a new Server (and clients) for another run"
        )
    total = _rounds(clients, rounds)
    link = transport or InProcessTransport.linking(server, by_id.values())
    outcomes = play_rounds(
        server,
        link,
        list(by_id),
        range(total),
        lambda t: temperature_at(t, total, temperature, anneal_fraction),
        progress,
    )
    final = server.broadcast(total, 1.0)
    for client in by_id.values():
        client.conclude(final)
    return FederationRun(total, tuple(outcomes))


def play_rounds(
    server: Server,
    transport: Transport,
    client_ids: Sequence[str],
    rounds: range,
    temperature: Callable[[int], float],
    progress: RoundCallback | None = None,
) -> list[RoundOutcome]:
    """The round loop every engine plays (this driver, `securegmi simulate`, Flower's ServerApp):
    `play_round` for each round of `rounds` over `transport`, `progress(round, outcome)` after
    each, and the server's transcript closed at the end, however the loop ends."""
    outcomes = []
    try:
        for t in rounds:
            outcome = play_round(server, transport, list(client_ids), t, temperature(t))
            outcomes.append(outcome)
            if progress is not None:
                progress(t, outcome)
    finally:
        server.close()
    return outcomes


def _rounds(clients: Sequence[Client], rounds: int | None) -> int:
    """The plan's rounds for a private run (every client holds the same plan), else `rounds`."""
    plans = {repr(c.plan) for c in clients}
    if len(plans) > 1:
        raise ConfigError("the clients hold different privacy plans: every site needs the federation's plan")
    plan = clients[0].plan
    if plan is None:
        if rounds is None:
            raise ConfigError("a federation without a privacy plan needs rounds=")
        if rounds < 1:
            raise ConfigError(f"rounds must be at least 1, got {rounds}")
        return rounds
    if rounds is not None and rounds != plan.rounds:
        raise ConfigError(
            f"the privacy plan was calibrated for {plan.rounds} rounds, not {rounds}: every round spends "
            "budget, so the run is the plan's length (omit rounds=, or calibrate for another)"
        )
    return plan.rounds
