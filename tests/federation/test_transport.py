"""What leaves a client: only declared fields, validated at both ends, recorded without values."""

from __future__ import annotations

import json

import numpy as np
import pytest

from securegmi.errors import BudgetExceededError, CryptoError, DataError, ProtocolViolation, RefusalError
from securegmi.federation.client import Client
from securegmi.federation.server import Server, play_round
from securegmi.federation.transport import ClientEndpoint, InProcessTransport
from securegmi.protocol import Message, NonPrivate, decode
from securegmi.protocols import plain
from securegmi.simulation.study import client_settings, load_federated_data, new_model
from tests.configs import small_config

CONFIG = small_config(rounds=2)


class SpyTransport(InProcessTransport):
    """Records every byte string that leaves a client."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.sent: list[tuple[str, bytes]] = []

    def deliver(self, client_id: str, wire: bytes) -> bytes:
        reply = super().deliver(client_id, wire)
        self.sent.append((client_id, reply))
        return reply


def leaky(client: Client):  # type: ignore[no-untyped-def]
    """A modified client that also sends its raw sample count, a field the protocol does not
    declare."""

    def handle(message: Message) -> Message:
        reply = client._handle(message)
        payload = dict(reply.payload)
        payload["n_samples"] = NonPrivate(np.array([float(len(client.learner.x))]))
        return Message(reply.stage, reply.round, reply.sender, payload)

    return handle


def _setup(tmp_path, leaks: set[str] = frozenset(), bypass: set[str] = frozenset()):  # type: ignore[assignment]
    data = load_federated_data(CONFIG)
    ref = new_model(CONFIG, data)
    spec = plain.build(components=ref.n_components, parameters=ref.parameter_count())
    server = Server(spec, transcript_path=tmp_path / "transcript.jsonl")
    endpoints = {}
    for i, c in enumerate(data.clients):
        cid = f"client-{i}"
        client = Client(cid, new_model(CONFIG, data), c.x_train, spec, settings=client_settings(CONFIG))
        handler = leaky(client) if cid in leaks | bypass else client._handle
        # A client whose own check is skipped (a modified client) must still be refused.
        endpoint_spec = _permissive(spec) if cid in bypass else spec
        endpoints[cid] = ClientEndpoint(cid, handler, endpoint_spec)
    transport = SpyTransport(server.endpoint, endpoints)
    return transport, server, server.endpoint.transcript


def _permissive(spec):  # type: ignore[no-untyped-def]
    class Permissive(type(spec)):  # type: ignore[misc]
        def validate(self, message, *, sender_role, sender=None):  # type: ignore[no-untyped-def]
            return None

    return Permissive(spec.name, spec.description, spec.stages, spec.release, spec.codec, spec.dims)


def test_only_declared_fields_leave_a_client(tmp_path):
    transport, server, transcript = _setup(tmp_path)
    exchange = transport.exchange({cid: server.broadcast(0, 10.0) for cid in transport.clients})
    transcript.close()
    assert not exchange.refused and len(exchange.replies) == 3
    declared = {f.name for f in plain.build(components=3, parameters=1).stage("update").fields}
    assert len(transport.sent) == 3
    for _, wire in transport.sent:
        assert set(decode(wire).payload) == declared


def test_undeclared_field_is_refused_at_the_client_and_nothing_leaves(tmp_path):
    transport, server, transcript = _setup(tmp_path, leaks={"client-1"})
    exchange = transport.exchange({cid: server.broadcast(0, 10.0) for cid in transport.clients})
    transcript.close()
    # The server records the refusal's class, not the client's text (test_client_endpoint_...
    # shows the client's own error names the field).
    assert exchange.refused["client-1"] == "refused by the client (ProtocolViolation)"
    assert sorted(exchange.replies) == ["client-0", "client-2"]  # the round completes without it
    assert [cid for cid, _ in transport.sent] == ["client-0", "client-2"]  # the spy saw no bytes
    rows = [json.loads(line) for line in (tmp_path / "transcript.jsonl").read_text().splitlines()]
    assert any(r["status"] == "refused" and r["sender"] == "client-1" for r in rows)


def test_client_endpoint_raises_protocol_violation(tmp_path):
    transport, server, transcript = _setup(tmp_path, leaks={"client-0"})
    from securegmi.protocol import encode

    with pytest.raises(ProtocolViolation, match="n_samples"):
        transport.clients["client-0"].receive(encode(server.broadcast(0, 10.0)))
    transcript.close()


def test_server_end_refuses_a_client_that_skips_its_own_check(tmp_path):
    transport, server, transcript = _setup(tmp_path, bypass={"client-2"})
    exchange = transport.exchange({cid: server.broadcast(0, 10.0) for cid in transport.clients})
    transcript.close()
    # The bytes did leave the modified client (the spy saw them) but the server refused them.
    assert "client-2" in [cid for cid, _ in transport.sent]
    assert "n_samples" in exchange.refused["client-2"]
    assert sorted(exchange.replies) == ["client-0", "client-1"]
    rows = [json.loads(line) for line in (tmp_path / "transcript.jsonl").read_text().splitlines()]
    assert any(r["status"] == "rejected" and r["field"] == "n_samples" for r in rows)


def test_transcript_holds_metadata_never_values(tmp_path):
    transport, server, transcript = _setup(tmp_path)
    exchange = transport.exchange({cid: server.broadcast(0, 10.0) for cid in transport.clients})
    transcript.close()
    rows = [json.loads(line) for line in (tmp_path / "transcript.jsonl").read_text().splitlines()]
    assert {r["field"] for r in rows} == {  # round 0's downlink is `start`: public values only
        "temperature",
        "masses",
        "component_index",
        "weighted_components",
    }
    allowed = {
        "round",
        "stage",
        "sender",
        "receiver",
        "run",
        "status",
        "message_bytes",
        "message_sha256",
        "field",
        "kind",
        "shape",
        "dtype",
        "bytes",
        "sha256",
    }
    assert all(set(r) <= allowed for r in rows)
    masses = exchange.replies["client-0"].payload["masses"].value  # type: ignore[union-attr]
    text = (tmp_path / "transcript.jsonl").read_text()
    assert f"{masses[0]:.6g}"[:6] not in text  # the values themselves are not written
    import hashlib

    row = next(r for r in rows if r["sender"] == "client-0" and r["field"] == "masses")
    assert row["sha256"] == hashlib.sha256(masses.tobytes()).hexdigest()


def test_a_client_errors_text_never_reaches_the_servers_transcript(tmp_path):
    """A client (one that is not securegmi's) answering with an error message of its own words:
    the server records the allowed form only. Negative control: the allowed form is kept."""
    from dataclasses import replace as with_error

    from securegmi.protocol import decode as decoded
    from securegmi.protocol import encode as encoded

    transport, server, transcript = _setup(tmp_path)
    broadcast = server.broadcast(0, 10.0)
    reply = decoded(transport.deliver("client-0", server.endpoint.send("client-0", broadcast)))
    chatty = with_error(
        reply, payload={}, events={}, error="BudgetExceededError: spent 3.87 of 4; pi [0.71, 0.29]"
    )
    allowed = with_error(chatty, error="refused by the client (BudgetExceededError)")
    for message in (chatty, allowed):
        server.endpoint.accept("client-0", encoded(message))
    transcript.close()
    errors = [
        json.loads(line).get("error") for line in (tmp_path / "transcript.jsonl").read_text().splitlines()
    ]
    assert "refused by the client (reason withheld)" in errors
    assert "refused by the client (BudgetExceededError)" in errors
    assert not any("3.87" in str(e) for e in errors)


class RefusingTransport(InProcessTransport):
    """Each client's delivery raises the error it is given instead of answering."""

    def __init__(self, *args, raises: dict[str, Exception], **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.raises = raises

    def deliver(self, client_id: str, wire: bytes) -> bytes:
        if client_id in self.raises:
            raise self.raises[client_id]
        return super().deliver(client_id, wire)


def test_every_refusal_is_one_class_and_the_round_goes_on_without_it(tmp_path):
    """A client's own check (ProtocolViolation), its ledger (BudgetExceededError) and its
    encryption (CryptoError) refuse through one base, RefusalError: the round completes with
    the others and the server records the class. Negative control: any other failure is a
    client that dropped out, recorded as such."""
    assert all(issubclass(e, RefusalError) for e in (ProtocolViolation, BudgetExceededError, CryptoError))
    base, server, _ = _setup(tmp_path)
    raises: dict[str, Exception] = {
        "client-0": BudgetExceededError("client-0: releasing counts@round0 would spend epsilon 9"),
        "client-1": DataError("client-1: records span [0, 16]"),
    }
    transport = RefusingTransport(server.endpoint, base.clients, raises=raises)
    outcome = play_round(server, transport, ["client-0", "client-1", "client-2"], 0, 1.0)
    assert set(outcome.replies) == {"client-2"}
    assert outcome.refused == {
        "client-0": "refused by the client (BudgetExceededError)",
        "client-1": "dropped out (DataError)",
    }
