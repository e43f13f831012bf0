"""Run securegmi on Flower: its Message API carries securegmi's encoded messages.

The only module that imports `flwr` (extra `securegmi[flower]`). Flower moves bytes between
processes and machines; everything securegmi checks in-process is checked here the same way,
by the same objects:
  - the client side is a `securegmi.Client`: its endpoint validates what arrives and what it
    sends, its ledger refuses a round over budget, it holds the CKKS secret key;
  - the server side is a `securegmi.Server`: its endpoint validates on receipt and keeps the
    transcript; it holds the public CKKS context only.

A Flower message carries one securegmi message as bytes in `content["securegmi"]["wire"]`
(safetensors: data only, nothing executable). Before round 0 the server asks each node which client it hosts
(message type "query"); after that, every reply from the node must be signed with that client
id (the endpoint's sender check), so a node cannot answer for another client.

Ray, which Flower's simulation engine uses, binds a non-loopback address unless
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` is set before it is imported: `loopback_environment`
sets that and keeps Flower's files inside the directory you name.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from securegmi.adapters.loopback import QUIET_ENV, SAFETY_ENV
from securegmi.crypto.keys import SecretContext
from securegmi.errors import ConfigError, ProtocolViolation, RefusalError, RunAbortedError
from securegmi.federation.client import Client
from securegmi.federation.codec import CkksCodec, ClearCodec, ClientCodec
from securegmi.federation.driver import play_rounds
from securegmi.federation.server import Server
from securegmi.federation.transport import (
    Exchange,
    ServerEndpoint,
    Transport,
    client_refusal,
    recorded_refusal,
)
from securegmi.files import write_atomic
from securegmi.protocol import Message as SecureGMIMessage
from securegmi.protocol import ProtocolSpec, decode, encode
from securegmi.records.rundir import (
    AGGREGATE,
    ENGINE,
    RunDirectory,
)

log = logging.getLogger(__name__)

__all__ = [  # with the Flower types the study module builds on (only this module imports flwr)
    "ClientApp",
    "Context",
    "FlowerTransport",
    "ServerApp",
    "ServerSetup",
    "client_app",
    "connect",
    "loopback_environment",
    "open_aggregate",
    "ray_environment",
    "save_aggregate",
    "server_app",
    "simulation_engine",
]

RECORD, WIRE, CLIENT_ID = "securegmi", "wire", "client-id"
QUERY, TRAIN = "query", "train"
REFUSED = 1  # Flower error code of a client that refused to answer (its checks or its ledger)

ClientFactory = Callable[[Context], Client]


def ray_environment(home: Path, ray_address: str | None) -> None:
    """Set up this process for Flower's simulation engine, before Ray is imported: Flower's files
    under `home`, telemetry and update checks off, and Ray kept on 127.0.0.1 unless it joins a
    cluster elsewhere (`ray_address`: the head's host:port, or "auto"). Refuses, with the reason,
    an address where nothing answers (Ray would retry it for minutes)."""
    if ray_address is None:
        loopback_environment(home)
        return
    host, _, port = ray_address.rpartition(":")
    if ray_address != "auto":
        if not host or not port.isdigit():
            raise ConfigError(f"a Ray address is the head's host:port or 'auto', got {ray_address!r}")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as exc:
            raise ConfigError(
                f"no Ray cluster answers at {ray_address} ({exc}); start one (`ray start --head`) or "
                "check the address"
            ) from None
    if host not in ("127.0.0.1", "localhost"):
        _flower_home(home)
        return
    # Ray rewrites a loopback head address to this host's network address unless told not to
    # when it is imported: too late if this process imported Ray already.
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and getattr(constants, "ENABLE_RAY_CLUSTER", False):
        raise ConfigError(
            "Ray was imported in this process without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, so it would "
            f"reach {ray_address} through this host's network address; set it before importing Ray, "
            "or run in a fresh process"
        )
    loopback_environment(home)


def loopback_environment(home: Path) -> None:
    """Keep Flower and Ray on 127.0.0.1 with Flower's files under `home`; call it before Flower
    starts Ray."""
    ray = home / "ray"
    # Ray's session sockets live about 70 characters below its temp dir, and a Unix socket path
    # may not exceed 107 bytes: a deep `home` gets a short private directory instead.
    if len(str(ray)) > 36:
        ray = Path(tempfile.mkdtemp(prefix="sg-ray-"))
    ray.mkdir(parents=True, exist_ok=True)
    _flower_home(home)
    os.environ.update({**SAFETY_ENV, "RAY_TMPDIR": str(ray)})


def _flower_home(home: Path) -> None:
    """Flower's files under `home`; telemetry and update checks off."""
    (home / "flwr").mkdir(parents=True, exist_ok=True)
    os.environ.update({**QUIET_ENV, "FLWR_HOME": str(home / "flwr")})


def _content(wire: bytes) -> RecordDict:
    return RecordDict({RECORD: ConfigRecord({WIRE: wire})})


def _wire(message: Message) -> bytes:
    value = message.content.config_records[RECORD][WIRE]
    if not isinstance(value, bytes):
        raise ProtocolViolation("a Flower message without securegmi wire bytes")
    return value


def client_app(factory: ClientFactory) -> ClientApp:
    """A Flower ClientApp around your `securegmi.Client`.

    `factory(context)` builds the node's client (its data, components, privacy plan and keys,
    from `context.node_config` and `context.run_config`). Flower may start a fresh process for
    any message, so give the client a `state_path`: it restores pi, its model copy and its
    ledger from there and saves them before every reply leaves.
    """
    app = ClientApp()

    def refusal(message: Message, exc: Exception) -> Message:
        # Nothing of this round leaves the client but the class of why it failed: the text of
        # a site's error can name its data (a DataError gives the records' range) and Flower
        # would put it in the server's reply (`str(exc)` in its own error). The site's log
        # keeps the full reason.
        log.warning("message %s refused: %s", message.metadata.message_id, exc)
        return Message(Error(code=REFUSED, reason=client_refusal(exc)), reply_to=message)

    @app.query()
    def identify(message: Message, context: Context) -> Message:
        try:
            client = factory(context)
        except Exception as exc:
            return refusal(message, exc)
        return Message(RecordDict({RECORD: ConfigRecord({CLIENT_ID: client.client_id})}), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        try:
            reply = factory(context).receive(_wire(message))
        except Exception as exc:
            return refusal(message, exc)
        return Message(_content(reply), reply_to=message)

    return app


class FlowerTransport(Transport):
    """The server's end over a Flower Grid: each securegmi message goes to its client's node."""

    def __init__(
        self, grid: Grid, endpoint: ServerEndpoint, nodes: Mapping[str, int], timeout: float | None
    ) -> None:
        self.grid = grid
        self.endpoint = endpoint
        self.nodes = dict(nodes)
        self.clients = {node: cid for cid, node in nodes.items()}
        self.timeout = timeout
        self.exchange_seconds: list[float] = []  # from sending a round's messages to the last reply

    def exchange(self, outgoing: Mapping[str, SecureGMIMessage]) -> Exchange:
        sent = [
            Message(
                _content(self.endpoint.send(cid, message)), dst_node_id=self.nodes[cid], message_type=TRAIN
            )
            for cid, message in outgoing.items()
        ]
        replies: dict[str, SecureGMIMessage] = {}
        refused: dict[str, str] = {}
        answered: set[str] = set()
        started = time.perf_counter()
        received = send_and_receive(self.grid, sent, self.timeout)
        self.exchange_seconds.append(time.perf_counter() - started)
        for reply in received:
            cid = self.clients.get(reply.metadata.src_node_id)
            if cid is None or cid not in outgoing:
                continue  # not a node this round addressed: nothing of it is used
            try:
                if cid in answered:
                    # One instruction, one reply: with two, which one the client meant is
                    # unknowable, so neither is added.
                    replies.pop(cid, None)
                    raise ProtocolViolation(f"{cid} sent more than one reply this round")
                answered.add(cid)
                if reply.has_error():
                    raise ProtocolViolation(f"{cid}: {recorded_refusal(reply.error.reason or '')}")
                replies[cid] = self.endpoint.accept(cid, _wire(reply))
            except RefusalError as exc:
                refused[cid] = str(exc)
                self.endpoint.refuse(cid, outgoing[cid], str(exc))
        for cid in set(outgoing) - set(replies) - set(refused):
            refused[cid] = "no reply before the round's timeout"
            self.endpoint.refuse(cid, outgoing[cid], refused[cid])
        return Exchange(replies, refused)


def save_aggregate(path: Path, server: Server, rounds: int) -> None:
    """The server's final broadcast, as the wire bytes a client would receive (ciphertexts
    under the secure protocol, which only a key holder can open: `open_aggregate`)."""
    write_atomic(path, encode(server.broadcast(rounds, 1.0)))


def open_aggregate(path: Path, spec: ProtocolSpec, keys: SecretContext | None) -> dict[str, np.ndarray]:
    """The final broadcast from `save_aggregate`, opened as a client opens it."""
    codec: ClientCodec = CkksCodec(keys) if keys is not None else ClearCodec()
    return codec.open(decode(path.read_bytes()), spec)


# How often the ServerApp asks the SuperLink for replies. Flower's own `Grid.send_and_receive`
# sleeps seconds between pulls, added to every exchange; a pull is one local RPC. The wait
# starts short and doubles up to the longest: a fixed wait rounds each quick exchange of the
# simulation engine up to a multiple of it, while a slow one is still asked only four times a
# second (figures: bench/results/tuning.md#flower-pull).
FIRST_PULL_S = 0.01
PULL_INTERVAL_S = 0.25


def send_and_receive(grid: Grid, messages: list[Message], timeout: float | None) -> list[Message]:
    """Push `messages` and pull their replies until all are in or `timeout` has passed."""
    waiting = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    pause = FIRST_PULL_S
    while waiting and (deadline is None or time.monotonic() < deadline):
        pulled = list(grid.pull_messages(waiting))
        replies += pulled
        waiting -= {reply.metadata.reply_to_message_id for reply in pulled}
        if waiting:
            time.sleep(pause)
            pause = min(2 * pause, PULL_INTERVAL_S)
    return replies


def connect(grid: Grid, clients: int, timeout: float) -> dict[str, int]:
    """Wait for `clients` nodes and learn which client each hosts: {client id: node id}."""
    deadline = time.monotonic() + timeout
    nodes = list(grid.get_node_ids())
    while len(nodes) < clients:
        if time.monotonic() > deadline:
            raise RunAbortedError(f"only {len(nodes)} of {clients} Flower nodes connected in {timeout:g} s")
        time.sleep(0.5)
        nodes = list(grid.get_node_ids())
    queries = [Message(RecordDict(), dst_node_id=node, message_type=QUERY) for node in nodes]
    mapping: dict[str, int] = {}
    for reply in send_and_receive(grid, queries, timeout):
        if reply.has_error():
            reason = recorded_refusal(reply.error.reason or "")
            raise RunAbortedError(f"node {reply.metadata.src_node_id} failed to start: {reason}")
        cid = str(reply.content.config_records[RECORD][CLIENT_ID])
        if cid in mapping:
            raise RunAbortedError(f"two Flower nodes claim to host {cid}")
        mapping[cid] = reply.metadata.src_node_id
    if len(mapping) < clients:
        raise RunAbortedError(f"only {len(mapping)} of {clients} Flower nodes answered who they host")
    return mapping


@dataclass(frozen=True)
class ServerSetup:
    """What the ServerApp runs: a server that holds no secret, and the round schedule."""

    server: Server  # its endpoint validates and records every message
    run_dir: RunDirectory | None  # gets engine.json: wall time, start, exchanges, refusals per round
    clients: int
    rounds: int
    temperature: Callable[[int], float]
    # ClientApps import torch, Opacus and TenSEAL before they answer: minutes on a loaded 2-core host.
    connect_timeout: float = 300.0
    round_timeout: float | None = None


def server_app(setup: Callable[[Context], ServerSetup]) -> ServerApp:
    """A Flower ServerApp that plays the rounds of `setup(context)` over the Grid."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        plan = setup(context)
        started = time.perf_counter()
        nodes = connect(grid, plan.clients, plan.connect_timeout)
        connected = time.perf_counter()
        transport = FlowerTransport(grid, plan.server.endpoint, nodes, plan.round_timeout)
        outcomes = play_rounds(plan.server, transport, sorted(nodes), range(plan.rounds), plan.temperature)
        refusals = [{**outcome.refused, **outcome.rejected} for outcome in outcomes]
        if plan.run_dir is not None:
            save_aggregate(plan.run_dir.file(AGGREGATE), plan.server, plan.rounds)
            summary = {
                "rounds": plan.rounds,
                "wall_seconds": time.perf_counter() - started,
                # Until every node answered who it hosts: the ClientApps' start (imports, study).
                "connect_seconds": connected - started,
                "exchange_seconds": transport.exchange_seconds,
                "refused": refusals,
            }
            plan.run_dir.write_json(ENGINE, summary)

    return app


def simulation_engine(
    server: ServerApp,
    client: ClientApp,
    supernodes: int,
    verbose: bool = False,
    ray_address: str | None = None,
) -> None:
    """Run the apps on Flower's simulation engine, one CPU per simulated SuperNode.

    Call `ray_environment` first. Without `ray_address` Flower starts a Ray of this machine's
    CPUs. With it, the apps join that running Ray cluster (`ray.init(address=...)`, e.g.
    "127.0.0.1:6379" or "auto"), whose own resources decide how many SuperNodes run at once:
    Ray refuses `num_cpus` from a process that joins a cluster."""
    from flwr.simulation import run_simulation

    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=supernodes,
        backend_config={
            "client_resources": {"num_cpus": 1},
            "init_args": {"include_dashboard": False, "num_cpus": os.cpu_count() or 1}
            if ray_address is None
            else {"include_dashboard": False, "address": ray_address},
        },
        verbose_logging=verbose,
    )
