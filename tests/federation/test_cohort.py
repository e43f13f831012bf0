"""Law 3 of docs/design.md §2: a split release is a sum of enough shares. Where each client adds a
sigma / sqrt(N - 1) share of the noise, the protocol declares N; no public API builds a server
below it, every private aggregate says how many releases it sums, and both ends refuse one of
fewer. Each check has its negative control: the same step with enough shares goes through."""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import numpy as np
import pytest

import securegmi
from securegmi.errors import ConfigError, PrivacyError, ProtocolViolation, RunAbortedError
from securegmi.federation.client import Client
from securegmi.federation.server import Server
from securegmi.protocol import Message, ProtocolSpec
from securegmi.protocol.fields import Public
from securegmi.simulation.study import Federation
from securegmi.vocabulary import FieldName
from tests.configs import private_config

SPLIT = private_config(clients=4)


def _federation() -> Federation:
    return Federation.build(SPLIT)


def _first_replies(federation: Federation, server: Server) -> dict[str, Message]:
    start = server.broadcast(0, 1.0)
    clients = [federation.client(i, None) for i in range(SPLIT.clients)]
    return {c.client_id: c.handle(start) for c in clients}


def test_the_public_server_takes_the_declared_minimum_cohort():
    """Server(spec) as a bring-your-own loop builds it: the review's attack (one share of a
    split release summed and sent back) is refused without any cohort argument."""
    federation = _federation()
    spec = securegmi.bind_protocol("dp", federation.new_model(), plan=federation.plan, clients=SPLIT.clients)
    assert spec.min_shares("moment_totals") == SPLIT.cohort_minimum == 4
    server = Server(spec)
    replies = _first_replies(federation, server)
    with pytest.raises(RunAbortedError, match="minimum cohort is 4"):
        server.aggregate(dict(list(replies.items())[:1]))
    assert server.totals == {}
    assert server.aggregate(replies) == {}  # negative control: the whole cohort is summed
    assert int(server.broadcast(1, 1.0).payload[FieldName.CONTRIBUTIONS].value) == 4


def test_a_server_cannot_be_built_below_the_declared_cohort():
    spec = _federation().spec
    with pytest.raises(ConfigError, match="below the 4 releases"):
        Server(spec, cohort_minimum={"moments": 1})
    assert Server(spec, cohort_minimum={"moments": 4}).cohort_minimum["moments"] == 4  # control
    assert Server(spec, cohort_minimum={"moments": 5}).cohort_minimum["moments"] == 5  # more is fine


def _short_aggregate(federation: Federation) -> tuple[Message, Message]:
    """An honest round-1 broadcast, and the one a deviating server would send: the same
    values claiming a sum of one release."""
    server = federation.server(None)
    server.aggregate(_first_replies(federation, server))
    honest = server.broadcast(1, 1.0)
    payload = {**honest.payload, FieldName.CONTRIBUTIONS: Public(np.asarray(1, dtype=np.int64))}
    return honest, dataclasses.replace(honest, payload=payload)


def test_both_ends_refuse_an_aggregate_of_fewer_releases():
    federation = _federation()
    honest, short = _short_aggregate(federation)
    federation.spec.validate(honest, sender_role="server")  # negative control
    with pytest.raises(ProtocolViolation, match="sums 1 client releases, the protocol requires at least 4"):
        federation.spec.validate(short, sender_role="server")
    client = federation.client(0, None)
    client.handle(federation.server(None).broadcast(0, 1.0))
    with pytest.raises(ProtocolViolation, match="requires at least 4"):
        client.handle(dataclasses.replace(short, run=client.run_id))
    assert client.ledger is not None
    assert {e.round for e in client.ledger.entries} == {0}  # nothing released in round 1


def test_a_client_refuses_a_protocol_declaring_fewer_shares_than_its_plan():
    federation = _federation()
    lax = federation.spec.bind(N=1)
    with pytest.raises(PrivacyError, match=r"sum 1 client releases .* needs at least 4"):
        Client(
            "client-0",
            federation.new_model(),
            federation.data.clients[0].x_train,
            lax,
            privacy=federation.client(0, None).policy.privacy,  # type: ignore[attr-defined]
        )
    # Negative control: the federation's own declaration is accepted (as _federation's clients are).
    assert federation.client(0, None).spec.dims["N"] == 4


def _client_on(federation: Federation, spec: ProtocolSpec) -> Client:
    return Client(
        "client-0",
        federation.new_model(),
        federation.data.clients[0].x_train,
        spec,
        privacy=federation.client(0, None).policy.privacy,  # type: ignore[attr-defined]
    )


def test_a_client_refuses_a_declaration_whose_aggregates_drop_the_minimum():
    """The review's variant: N kept in the dimensions, but a stage that sums releases with no
    minimum and no count of them (a declaration rebuilt by hand)."""
    federation = _federation()
    spec = federation.spec
    stages = tuple(
        dataclasses.replace(
            s, min_shares=1, fields=tuple(f for f in s.fields if f.name != FieldName.CONTRIBUTIONS)
        )
        if s.name == "moment_totals"
        else s
        for s in spec.stages
    )
    with pytest.raises(PrivacyError, match="'moment_totals' sum 1 client releases"):
        _client_on(federation, dataclasses.replace(spec, stages=stages))
    _client_on(federation, spec)  # negative control


def test_split_noise_is_never_sent_in_the_clear():
    """A plan that splits its noise (secure's default) under the clear dp declaration: one
    share would be read with a fraction of the noise: refused by the client."""
    secure = replace(SPLIT, protocol="secure")
    federation = Federation.build(secure)
    assert federation.plan.statistics.placement == "split"  # type: ignore[union-attr]
    clear = securegmi.bind_protocol("dp", federation.new_model(), plan=federation.plan, clients=SPLIT.clients)
    privacy = federation.client(0, federation_keys(federation)).policy.privacy  # type: ignore[attr-defined]
    with pytest.raises(PrivacyError, match="sends releases in the clear"):
        Client("client-0", federation.new_model(), federation.data.clients[0].x_train, clear, privacy=privacy)
    # Negative control: the same declaration with a local-noise plan is accepted (test _federation).
    _client_on(_federation(), _federation().spec)


def federation_keys(federation: Federation):  # type: ignore[no-untyped-def]
    from securegmi.crypto.keys import SecretContext

    return SecretContext.generate(federation.ckks_parameters())
