"""Flower node identity: a reply counts for the client hosted on the node Flower says it came
from (the SuperLink sets a reply's source to the node the instruction was addressed to), never
for the client the reply claims to be, and only if that client was addressed this round.

These branches are reached only by a misbehaving node or a late reply, so a scripted Grid plays
the network: it hands each instruction to a real securegmi `Client` on the node's behalf and
returns real Flower reply messages, plus the misbehaving reply a test asks for. Everything under
test (`FlowerTransport`, `connect`, the server endpoint and its checks) is the shipped code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from uuid import uuid4

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from securegmi.adapters.flower import CLIENT_ID, QUERY, RECORD, TRAIN, FlowerTransport, connect
from securegmi.errors import RunAbortedError
from securegmi.federation.client import Client
from securegmi.federation.server import Server
from securegmi.protocol import decode, encode
from securegmi.simulation.study import Federation
from tests.configs import small_config

CONFIG = small_config(hidden=4, latent=1, rounds=2)
NODES = {"client-0": 11, "client-1": 12, "client-2": 13}

Extra = Callable[[list[Message]], Iterable[Message]]


@pytest.fixture(autouse=True)
def flower_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Flower message records the task that created it; here, a ServerApp's."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


class PushPullGrid:
    """A Grid's push and pull, as Flower's in-memory grid does them (an id per pushed
    message), with the replies `replies_to` scripts: all of them on the first pull."""

    pending: list[Message]

    def replies_to(self, sent: list[Message]) -> list[Message]:
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        sent = list(messages)
        for message in sent:
            message.metadata.__dict__["_message_id"] = str(uuid4())
        self.pending = self.replies_to(sent)
        return [m.metadata.message_id for m in sent]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        pulled, self.pending = self.pending, []
        return pulled


class ScriptedGrid(PushPullGrid):
    """Delivers each TRAIN instruction to the client its node hosts and returns the reply a
    ClientApp would send; `extra` adds replies of its own (what a misbehaving node sends)."""

    def __init__(self, clients: dict[str, Client], extra: Extra | None = None) -> None:
        self.hosted = {NODES[cid]: client for cid, client in clients.items()}
        self.extra = extra

    def replies_to(self, sent: list[Message]) -> list[Message]:
        replies = []
        for message in sent:
            client = self.hosted.get(message.metadata.dst_node_id)
            if client is None:
                continue  # this node sends only what `extra` makes it send
            wire = client.receive(message.content.config_records[RECORD]["wire"])
            replies.append(Message(RecordDict({RECORD: ConfigRecord({"wire": wire})}), reply_to=message))
        return replies + list(self.extra(sent) if self.extra else [])


def _setup() -> tuple[Federation, dict[str, Client], Server]:
    federation = Federation.build(CONFIG)
    clients = {cid: federation.client(i, None) for i, cid in enumerate(federation.client_ids)}
    return federation, clients, federation.server(None)


def _resigned(message: Message, wire_of: Callable[[], bytes]) -> Message:
    """A reply to `message` (so from the node it was addressed to) carrying other wire bytes."""
    return Message(RecordDict({RECORD: ConfigRecord({"wire": wire_of()})}), reply_to=message)


def test_a_node_cannot_answer_for_another_client():
    """Node 12 hosts client-1 and replies with client-0's signed update: it is refused, and
    client-0's own reply is the one used."""
    _, clients, server = _setup()
    broadcast = server.broadcast(0, 1.0)

    def forged(sent: list[Message]) -> list[Message]:
        to_node_12 = next(m for m in sent if m.metadata.dst_node_id == 12)
        return [_resigned(to_node_12, lambda: encode(clients["client-0"].handle(broadcast)))]

    grid = ScriptedGrid({"client-0": clients["client-0"]}, forged)
    transport = FlowerTransport(grid, server.endpoint, NODES, timeout=None)  # type: ignore[arg-type]
    exchange = transport.exchange({"client-0": broadcast, "client-1": broadcast})
    assert set(exchange.replies) == {"client-0"}
    assert "sender claims to be 'client-0', link is 'client-1'" in exchange.refused["client-1"]
    assert exchange.replies["client-0"].sender == "client-0"


def test_a_second_reply_from_one_node_drops_that_client_from_the_round():
    """Node 12 answers its instruction twice, each validly signed: which one client-1 meant is
    unknowable, so neither is used."""
    _, clients, server = _setup()
    broadcast = server.broadcast(0, 1.0)
    second = encode(clients["client-1"].handle(broadcast))

    def again(sent: list[Message]) -> list[Message]:
        return [_resigned(next(m for m in sent if m.metadata.dst_node_id == 12), lambda: second)]

    grid = ScriptedGrid({"client-0": clients["client-0"], "client-1": clients["client-1"]}, again)
    transport = FlowerTransport(grid, server.endpoint, NODES, timeout=None)  # type: ignore[arg-type]
    exchange = transport.exchange({"client-0": broadcast, "client-1": broadcast})
    assert set(exchange.replies) == {"client-0"}
    assert "more than one reply" in exchange.refused["client-1"]


def test_replies_from_nodes_not_addressed_this_round_are_never_used():
    """Two stray replies: one from client-2's node, which this round did not address (a late
    reply to an old instruction), and one from a node that hosts no client at all. Neither is
    used or refused on anyone's behalf; the addressed client's reply is."""
    _, clients, server = _setup()
    broadcast = server.broadcast(0, 1.0)
    stray_wire = encode(clients["client-2"].handle(broadcast))

    def strays(sent: list[Message]) -> list[Message]:
        old = Message(RecordDict(), dst_node_id=NODES["client-2"], message_type=TRAIN)
        unknown = Message(RecordDict(), dst_node_id=99, message_type=TRAIN)
        return [_resigned(old, lambda: stray_wire), _resigned(unknown, lambda: stray_wire)]

    grid = ScriptedGrid({"client-0": clients["client-0"]}, strays)
    transport = FlowerTransport(grid, server.endpoint, NODES, timeout=None)  # type: ignore[arg-type]
    exchange = transport.exchange({"client-0": broadcast})
    assert set(exchange.replies) == {"client-0"} and exchange.refused == {}
    assert server.aggregate(exchange.replies) == {}
    masses = server.totals["component_masses"]
    assert isinstance(masses, np.ndarray)
    assert np.allclose(masses, decode(encode(exchange.replies["client-0"])).payload["masses"].value)  # type: ignore[union-attr]


class IdentityGrid(PushPullGrid):
    """Answers `connect`'s query: which client each node says it hosts."""

    def __init__(self, claims: dict[int, str]) -> None:
        self.claims = claims

    def get_node_ids(self) -> list[int]:
        return list(self.claims)

    def replies_to(self, sent: list[Message]) -> list[Message]:
        out = []
        for message in sent:
            assert message.metadata.message_type == QUERY
            claim = self.claims[message.metadata.dst_node_id]
            out.append(Message(RecordDict({RECORD: ConfigRecord({CLIENT_ID: claim})}), reply_to=message))
        return out


def test_two_nodes_claiming_one_client_stop_the_run_before_round_0():
    honest = {11: "client-0", 12: "client-1", 13: "client-2"}
    assert connect(IdentityGrid(honest), 3, timeout=1.0) == NODES  # type: ignore[arg-type]
    with pytest.raises(RunAbortedError, match="two Flower nodes claim to host client-1"):
        connect(IdentityGrid({**honest, 13: "client-1"}), 3, timeout=1.0)  # type: ignore[arg-type]


def test_a_silent_node_and_a_refusing_node_are_each_refused_with_their_reason():
    """client-1's node stays silent past the round's timeout; client-2's node answers with a
    Flower error (its ledger refused): the round completes with client-0 alone. The server
    records a refusal's class, never free text from the client (point 6 of issue 25)."""
    from flwr.app import Error

    _, clients, server = _setup()
    broadcast = server.broadcast(0, 1.0)

    def refusal(sent: list[Message]) -> list[Message]:
        to_node_13 = next(m for m in sent if m.metadata.dst_node_id == 13)
        return [Message(Error(code=1, reason=reason), reply_to=to_node_13)]

    def refused_with(text: str) -> dict[str, str]:
        nonlocal reason
        reason = text
        grid = ScriptedGrid({"client-0": clients["client-0"]}, refusal)
        transport = FlowerTransport(grid, server.endpoint, NODES, timeout=0.5)  # type: ignore[arg-type]
        exchange = transport.exchange(dict.fromkeys(NODES, broadcast))
        assert set(exchange.replies) == {"client-0"}
        return exchange.refused

    reason = ""
    assert refused_with("refused by the client (BudgetExceededError)") == {
        "client-1": "no reply before the round's timeout",
        "client-2": "client-2: refused by the client (BudgetExceededError)",
    }
    # A client's own text (here a private spend) never reaches the server's records.
    assert refused_with("over budget: 7.93 of 8 spent")["client-2"] == (
        "client-2: refused by the client (reason withheld)"
    )


class FailingNodeGrid(IdentityGrid):
    """One node's ClientApp fails to build its client, with an error naming its records."""

    def __init__(self, claims: dict[int, str], reason: str) -> None:
        super().__init__(claims)
        self.reason = reason

    def replies_to(self, sent: list[Message]) -> list[Message]:
        from flwr.app import Error

        out = super().replies_to(sent)
        failing = next(m for m in sent if m.metadata.dst_node_id == 13)
        return [m for m in out if m.metadata.reply_to_message_id != failing.metadata.message_id] + [
            Message(Error(code=1, reason=self.reason), reply_to=failing)
        ]


def test_a_node_that_fails_to_start_is_reported_without_its_text():
    """A site's error text (here Flower's wrapping of a DataError naming the records' range)
    never reaches the server; the allowed form does (negative control)."""
    claims = {11: "client-0", 12: "client-1", 13: "client-2"}
    leaky = "<class 'securegmi.errors.DataError'>:<'the records span [-0.813424, 1.74477]'>"
    with pytest.raises(RunAbortedError) as caught:
        connect(FailingNodeGrid(claims, leaky), 3, timeout=1.0)  # type: ignore[arg-type]
    assert "0.813424" not in str(caught.value) and "reason withheld" in str(caught.value)
    with pytest.raises(RunAbortedError, match=r"refused by the client \(DataError\)"):
        connect(FailingNodeGrid(claims, "refused by the client (DataError)"), 3, timeout=1.0)  # type: ignore[arg-type]
