"""Run securegmi on Flower: its Message API carries securegmi's encoded messages.

The only module that imports `flwr` (extra `securegmi[flower]`). Flower moves bytes between
processes and machines; everything securegmi checks in-process is checked here the same way,
by the same objects:
  - the client side is a `securegmi.Client`: its endpoint validates what arrives and what it
    sends, its ledger refuses a round over budget, it holds the CKKS secret key;
  - the server side is `ServerEndpoint` (validation on receipt, the transcript) around the same
    aggregation server, which holds the public CKKS context only.

A Flower message carries one securegmi message as bytes in `content["securegmi"]["wire"]`
(safetensors, never pickle). Before round 0 the server asks each node which client it hosts
(message type "query"); after that, every reply from the node must be signed with that client
id (the endpoint's sender check), so a node cannot answer for another client.

Ray, which Flower's simulation engine uses, binds a non-loopback address unless
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` is set before it is imported: `loopback_environment`
sets that and keeps Flower's files inside the directory you name.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from securegmi.config import SimulationConfig
from securegmi.crypto.envelope import decrypt
from securegmi.crypto.keys import PUBLIC_FILE, PublicContext, SecretContext
from securegmi.engine.federated import Federation, ProtocolBuilder, play_round
from securegmi.engine.loop import Loop
from securegmi.engine.participant import Client
from securegmi.engine.rundir import CONFIG, LEDGERS, TRANSCRIPT, RunDirectory
from securegmi.engine.secure_server import SecureAggregationServer
from securegmi.engine.server import AggregationServer
from securegmi.engine.transport import Exchange, ServerEndpoint, Transport
from securegmi.errors import (
    BudgetExceededError,
    ConfigError,
    CryptoError,
    ProtocolViolation,
    RunAbortedError,
)
from securegmi.protocol import Message as SecureGMIMessage
from securegmi.protocol import TranscriptWriter

RECORD, WIRE, CLIENT_ID = "securegmi", "wire", "client-id"
QUERY, TRAIN = "query", "train"
REFUSED = 1  # Flower error code of a client that refused to answer (its checks or its ledger)
FLOWER_SUMMARY = "flower.json"
AGGREGATE_FILE = "aggregate.safetensors"

ClientFactory = Callable[[Context], Client]


def loopback_environment(home: Path) -> dict[str, str]:
    """The environment that keeps Flower and Ray on 127.0.0.1 with their files under `home`;
    set it before Flower starts Ray (it is also returned, for subprocesses)."""
    env = {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_HOME": str(home / "flwr"),
        "RAY_TMPDIR": str(home / "ray"),
    }
    for name in ("flwr", "ray"):
        (home / name).mkdir(parents=True, exist_ok=True)
    os.environ.update(env)
    return env


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

    @app.query()
    def identify(message: Message, context: Context) -> Message:
        client = factory(context)
        return Message(RecordDict({RECORD: ConfigRecord({CLIENT_ID: client.client_id})}), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        client = factory(context)
        try:
            reply = client.receive(_wire(message))
        except (ProtocolViolation, BudgetExceededError, CryptoError) as exc:
            # Nothing of this round leaves the client: only why it refused.
            return Message(Error(code=REFUSED, reason=str(exc)), reply_to=message)
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

    def exchange(self, outgoing: Mapping[str, SecureGMIMessage]) -> Exchange:
        sent = [
            Message(
                _content(self.endpoint.send(cid, message)), dst_node_id=self.nodes[cid], message_type=TRAIN
            )
            for cid, message in outgoing.items()
        ]
        replies: dict[str, SecureGMIMessage] = {}
        refused: dict[str, str] = {}
        for reply in self.grid.send_and_receive(sent, timeout=self.timeout):
            cid = self.clients.get(reply.metadata.src_node_id)
            if cid is None or cid not in outgoing:
                continue  # not a node this round addressed: nothing of it is used
            try:
                if reply.has_error():
                    raise ProtocolViolation(f"{cid} refused: {reply.error.reason}")
                replies[cid] = self.endpoint.accept(cid, _wire(reply))
            except (ProtocolViolation, CryptoError) as exc:
                refused[cid] = str(exc)
                self.endpoint.refuse(cid, outgoing[cid], str(exc))
        for cid in set(outgoing) - set(replies) - set(refused):
            refused[cid] = "no reply before the round's timeout"
            self.endpoint.refuse(cid, outgoing[cid], refused[cid])
        return Exchange(replies, refused)


def save_aggregate(path: Path, server: AggregationServer | SecureAggregationServer) -> None:
    """The server's final (S, W): ciphertext envelopes under the secure protocol, which only a
    key holder can open (`load_aggregate`); plain sums otherwise."""
    if isinstance(server, SecureAggregationServer):
        assert server.sums is not None and server.masses is not None
        arrays = {
            name: np.frombuffer(b, dtype=np.uint8)
            for name, b in (("sums", server.sums), ("masses", server.masses))
        }
        metadata = {"encrypted": "true", "key_id": server.public.key_id}
    else:
        arrays, metadata = {"sums": server.sums, "masses": server.masses}, {"encrypted": "false"}
    tmp = path.with_suffix(".tmp")
    save_file(arrays, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_aggregate(path: Path, keys: SecretContext | None) -> tuple[np.ndarray, np.ndarray]:
    """(S, W) from `save_aggregate`, decrypted with `keys` where they are ciphertexts."""
    arrays = load_file(str(path))
    with safe_open(str(path), framework="numpy") as fh:
        encrypted = (fh.metadata() or {}).get("encrypted") == "true"
    if not encrypted:
        return arrays["sums"], arrays["masses"]
    if keys is None:
        raise CryptoError(f"{path} holds ciphertexts: opening them needs the clients' key")
    return decrypt(keys, arrays["sums"].tobytes()), decrypt(keys, arrays["masses"].tobytes())


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
    for reply in grid.send_and_receive(queries, timeout=timeout):
        if reply.has_error():
            raise RunAbortedError(f"node {reply.metadata.src_node_id} failed to start: {reply.error.reason}")
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

    server: AggregationServer | SecureAggregationServer
    endpoint: ServerEndpoint
    run_dir: RunDirectory | None  # gets flower.json: wall time and refusals per round
    clients: int
    rounds: int
    temperature: Callable[[int], float]
    connect_timeout: float = 120.0
    round_timeout: float | None = None


def server_app(setup: Callable[[Context], ServerSetup]) -> ServerApp:
    """A Flower ServerApp that plays the rounds of `setup(context)` over the Grid."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        plan = setup(context)
        started = time.perf_counter()
        nodes = connect(grid, plan.clients, plan.connect_timeout)
        transport = FlowerTransport(grid, plan.endpoint, nodes, plan.round_timeout)
        refusals = []
        try:
            for t in range(plan.rounds):
                outcome = play_round(plan.server, transport, sorted(nodes), t, plan.temperature(t))
                refusals.append({**outcome.refused, **outcome.rejected})
        finally:
            if plan.endpoint.transcript is not None:
                plan.endpoint.transcript.close()
        if plan.run_dir is not None:
            save_aggregate(plan.run_dir.file(AGGREGATE_FILE), plan.server)
            summary = {
                "rounds": plan.rounds,
                "wall_seconds": time.perf_counter() - started,
                "refused": refusals,
            }
            plan.run_dir.write_json(FLOWER_SUMMARY, summary)

    return app


# --- The embedded study (`securegmi simulate`'s data and protocol), carried by Flower. ---

STATES = "client-states"


def study_config(run_config: Mapping[str, Any]) -> SimulationConfig:
    try:
        return SimulationConfig.from_dict(json.loads(str(run_config["study"])))
    except (KeyError, json.JSONDecodeError) as exc:
        raise ConfigError(f"the Flower run config needs 'study', a SimulationConfig as JSON ({exc})") from exc


def study_client(
    config: SimulationConfig, builder: ProtocolBuilder, run_dir: Path, index: int, key_dir: Path | None
) -> Client:
    """Client `index` of the embedded study, with its state and ledger under `run_dir`."""
    federation = Federation.build(config, builder)
    keys = None
    if federation.secure:
        if key_dir is None:
            raise CryptoError("the secure protocol needs the node's key directory ('key-dir')")
        keys = SecretContext.load(key_dir, federation.ckks_parameters())
    cid = federation.client_ids[index]
    return federation.client(
        index,
        keys,
        run_dir / LEDGERS if federation.plan is not None else None,
        state_path=run_dir / STATES / f"{cid}.safetensors",
    )


def study_server(
    config: SimulationConfig, builder: ProtocolBuilder, run_dir: Path, public_key: Path | None
) -> ServerSetup:
    """The server of the embedded study; it reads the public CKKS context only."""
    federation = Federation.build(config, builder)
    public = None
    if federation.secure:
        if public_key is None or public_key.name != PUBLIC_FILE:
            raise CryptoError(
                f"the secure protocol's server needs the ceremony's {PUBLIC_FILE} ('public-key')"
            )
        public = PublicContext(public_key.read_bytes(), federation.ckks_parameters())
    directory = RunDirectory(run_dir)
    directory.write_json(CONFIG, config.to_dict())
    federation.write_public_files(directory)
    (run_dir / STATES).mkdir(exist_ok=True)
    loop = Loop(config, federation.data, None, None)
    return ServerSetup(
        federation.server(public),
        ServerEndpoint(federation.spec, TranscriptWriter(directory.file(TRANSCRIPT))),
        directory,
        len(federation.client_ids),
        config.rounds,
        loop.temperature,
    )


def study_apps(
    config: SimulationConfig, builder: ProtocolBuilder, run_dir: Path, key_dir: Path | None = None
) -> tuple[ServerApp, ClientApp]:
    """ServerApp and ClientApp of the embedded study for Flower's simulation engine, where every
    node shares this machine (`flwr.simulation.run_simulation(..., num_supernodes=config.clients)`).
    The run directory gets the same files as an in-process run's server side, plus each
    client's state, and `flower.json`."""
    run_dir = Path(run_dir)

    def make_client(context: Context) -> Client:
        return study_client(config, builder, run_dir, int(context.node_config["partition-id"]), key_dir)

    def make_server(context: Context) -> ServerSetup:
        return study_server(config, builder, run_dir, key_dir / PUBLIC_FILE if key_dir is not None else None)

    return server_app(make_server), client_app(make_client)
