"""What leaves a client: only declared fields, validated at both ends, recorded without values."""

from __future__ import annotations

import json

import numpy as np
import pytest

from securegmi.config import SimulationConfig
from securegmi.engine.client import FedGMIClient
from securegmi.engine.loop import client_settings, load_federated_data, new_model
from securegmi.engine.server import AggregationServer
from securegmi.engine.transport import ClientEndpoint, InProcessTransport, ServerEndpoint
from securegmi.errors import ProtocolViolation
from securegmi.protocol import Message, NonPrivate, TranscriptWriter, decode
from securegmi.protocols import plain

CONFIG = SimulationConfig(dataset="synthetic", clients=3, rounds=2, local_epochs=1, hidden=16, latent=2)


class SpyTransport(InProcessTransport):
    """Records every byte string that leaves a client."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.sent: list[tuple[str, bytes]] = []

    def deliver(self, client_id: str, wire: bytes) -> bytes:
        reply = super().deliver(client_id, wire)
        self.sent.append((client_id, reply))
        return reply


class LeakyClient(FedGMIClient):
    """A client that also sends its raw sample count: a field the protocol does not declare."""

    def handle(self, message: Message) -> Message:
        reply = super().handle(message)
        payload = dict(reply.payload)
        payload["n_samples"] = NonPrivate(np.array([float(len(self.x_train))]))
        return Message(reply.stage, reply.round, reply.sender, payload)


def _setup(tmp_path, leaky: set[str] = frozenset(), bypass: set[str] = frozenset()):  # type: ignore[assignment]
    data = load_federated_data(CONFIG)
    ref = new_model(CONFIG, data)
    spec = plain.build(components=ref.n_components, parameters=ref.parameter_count())
    transcript = TranscriptWriter(tmp_path / "transcript.jsonl")
    endpoints = {}
    for i, c in enumerate(data.clients):
        cid = f"client-{i}"
        cls = LeakyClient if cid in leaky | bypass else FedGMIClient
        client = cls(cid, c.x_train, new_model(CONFIG, data), client_settings(CONFIG), spec, 0)
        # A client whose own check is skipped (a modified client) must still be refused.
        endpoint_spec = plain.build(components=ref.n_components, parameters=ref.parameter_count())
        if cid in bypass:
            endpoint_spec = _permissive(endpoint_spec)
        endpoints[cid] = ClientEndpoint(cid, client.handle, endpoint_spec)
    transport = SpyTransport(ServerEndpoint(spec, transcript), endpoints)
    return transport, AggregationServer(ref.get_component_vectors(), spec), transcript


def _permissive(spec):  # type: ignore[no-untyped-def]
    class Permissive(type(spec)):  # type: ignore[misc]
        def validate(self, message, *, sender_role, sender=None):  # type: ignore[no-untyped-def]
            return None

    return Permissive(spec.name, spec.description, spec.stages, spec.dims)


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
    transport, server, transcript = _setup(tmp_path, leaky={"client-1"})
    exchange = transport.exchange({cid: server.broadcast(0, 10.0) for cid in transport.clients})
    transcript.close()
    assert "undeclared" in exchange.refused["client-1"] and "n_samples" in exchange.refused["client-1"]
    assert sorted(exchange.replies) == ["client-0", "client-2"]  # the round completes without it
    assert [cid for cid, _ in transport.sent] == ["client-0", "client-2"]  # the spy saw no bytes
    rows = [json.loads(line) for line in (tmp_path / "transcript.jsonl").read_text().splitlines()]
    assert any(r["status"] == "refused" and r["sender"] == "client-1" for r in rows)


def test_client_endpoint_raises_protocol_violation(tmp_path):
    transport, server, transcript = _setup(tmp_path, leaky={"client-0"})
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
    assert {r["field"] for r in rows} == {
        "component_sums",
        "component_masses",
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
