"""One `Client` and one `Server` serve every protocol: a contract over all of `protocols/`.

Each protocol (and each private design under the DP ones) runs a few rounds through the same
two classes; every message both ways is what the declaration says, every server field the
declared sum, and the classes are never subclassed or type-tested to choose behaviour.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from securegmi import Client, Server
from securegmi.crypto.keys import SecretContext
from securegmi.errors import ProtocolViolation
from securegmi.federation.server import play_round
from securegmi.federation.transport import InProcessTransport
from securegmi.protocol import registry
from securegmi.simulation.study import Federation
from tests.configs import small_config

ROOT = Path(__file__).resolve().parents[2]
EM = {"rounds": 2}  # the statistics design's length is its own (vae_rounds, kmeans_iterations)
PRIVATE = {"epsilon": 8.0, "min_clients": 3, "vae_rounds": 1, "kmeans_iterations": 1}
CASES = {
    "plain": EM,
    "dp-em": {"protocol": "dp", "private_training": "em", "epsilon": 8.0, **EM},
    "dp-statistics": {"protocol": "dp", **PRIVATE},
    "secure-em": {"protocol": "secure", "private_training": "em", "epsilon": 8.0, **EM},
    "secure-statistics": {"protocol": "secure", **PRIVATE},
}


def test_every_protocol_module_has_a_case():
    assert {name.split("-")[0] for name in CASES} == set(registry.available())


@pytest.mark.parametrize("case", list(CASES))
def test_the_protocol_runs_through_the_one_client_and_the_one_server(case):
    config = small_config(hidden=8, **CASES[case])
    federation = Federation.build(config)
    keys = SecretContext.generate(federation.ckks_parameters()) if federation.secure else None
    clients = {cid: federation.client(i, keys) for i, cid in enumerate(federation.client_ids)}
    server = federation.server(keys.public() if keys is not None else None)
    assert all(type(c) is Client for c in clients.values()) and type(server) is Server
    transport = InProcessTransport.linking(server, clients.values())
    spec = federation.spec
    for t in range(federation.rounds):
        outcome = play_round(server, transport, list(clients), t, 1.0)
        assert not outcome.refused and not outcome.rejected, (outcome.refused, outcome.rejected)
        for message in outcome.replies.values():  # the server end validated them; check the stage
            assert spec.stage(message.stage).sender == "client"
        assert server.after is not None
        downlink = spec.downlink_after(server.after)
        assert set(server.totals) == {f.name for f in downlink.fields if f.sum_of is not None}
        spec.validate(server.broadcast(t + 1, 1.0), sender_role="server")
    assert {c.pi.shape for c in clients.values()} == {(config.model_components,)}
    assert all(np.isclose(c.pi.sum(), 1.0) for c in clients.values())
    assert (clients["client-0"].ledger is None) == (spec.release == "none")


def _behaviour_switches(source: str) -> list[str]:
    """isinstance/type tests on the client, server, policy or codec classes."""
    names = {"Client", "Server", "PlainRelease", "CountsRelease", "StatisticsRelease", "CkksCodec"}
    names |= {"ClearCodec", "ClearSum", "CkksSum", "LocalLearner"}
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in {"isinstance", "issubclass"}:
            for arg in ast.walk(node.args[1]):
                if isinstance(arg, ast.Name) and arg.id in names:
                    found.append(arg.id)
    return found


def test_no_library_code_chooses_behaviour_by_client_or_server_type():
    found = {
        str(p.relative_to(ROOT)): _behaviour_switches(p.read_text())
        for folder in ("securegmi", "cli", "protocols")
        for p in (ROOT / folder).rglob("*.py")
    }
    assert {path: names for path, names in found.items() if names} == {}
    # Negative control: the check sees a type switch on the server.
    assert _behaviour_switches("if isinstance(server, Server):\n    pass\n") == ["Server"]
    assert Client.__subclasses__() == [] and Server.__subclasses__() == []


def test_a_reply_to_an_earlier_round_is_never_added():
    config = small_config(hidden=8, **EM)
    federation = Federation.build(config)
    clients = {cid: federation.client(i, None) for i, cid in enumerate(federation.client_ids)}
    server = federation.server(None)
    transport = InProcessTransport.linking(server, clients.values())
    old = play_round(server, transport, list(clients), 0, 1.0).replies
    fresh = transport.exchange({cid: server.broadcast(1, 1.0) for cid in clients}).replies
    assert server.aggregate(fresh) == {}  # negative control: this round's replies are added
    replayed = transport.exchange({cid: server.broadcast(2, 1.0) for cid in clients}).replies
    replayed["client-1"] = old["client-1"]  # round 0's reply, resent in round 2
    rejected = server.aggregate(replayed)
    assert list(rejected) == ["client-1"] and "round 0 in round 2" in rejected["client-1"]


def test_messages_are_bound_to_their_run_sender_and_round():
    """A reply from another run, a reply signed by another client, and a second batch for a
    round already added are refused by the server; a client refuses another run's server.
    The same round's own replies are added (negative control)."""
    config = small_config(hidden=8, **EM)
    federation = Federation.build(config)
    clients = {cid: federation.client(i, None) for i, cid in enumerate(federation.client_ids)}
    server, other = federation.server(None), federation.server(None)
    assert server.run_id != other.run_id  # a fresh id per run
    transport = InProcessTransport.linking(server, clients.values())
    other.broadcast(0, 1.0)
    from_other_run = clients["client-0"].handle(other.broadcast(0, 1.0))  # client-0 now in `other`
    replies = transport.exchange({cid: server.broadcast(0, 1.0) for cid in clients})
    # It refuses another run's server; the server records the refusal's class only.
    assert replies.refused["client-0"] == "refused by the client (ProtocolViolation)"
    with pytest.raises(ProtocolViolation, match="this client is in run"):
        clients["client-0"].handle(server.broadcast(0, 1.0))
    forged = {**replies.replies, "client-0": from_other_run, "client-3": replies.replies["client-1"]}
    rejected = server.aggregate(forged)
    assert "another run" in rejected["client-0"]
    assert "signed by 'client-1' on 'client-3'" in rejected["client-3"]
    assert set(rejected) == {"client-0", "client-3"}  # client-1 and client-2 were added
    with pytest.raises(ProtocolViolation, match="already aggregated"):
        server.aggregate(replies.replies)
