"""Run securegmi on Flower: its Message API carries securegmi's encoded messages.

The only module that imports `flwr` (extra `securegmi[flower]`). Flower moves bytes between
processes and machines; everything securegmi checks in-process is checked here the same way,
by the same objects:
  - the client side is a `securegmi.Client`: its endpoint validates what arrives and what it
    sends, its ledger refuses a round over budget, it holds the CKKS secret key;
  - the server side is `ServerEndpoint` (validation on receipt, the transcript) around the same
    aggregation server, which holds the public CKKS context only.

A Flower message carries one securegmi message as bytes in `content["securegmi"]["wire"]`
(safetensors: data only, nothing executable). Before round 0 the server asks each node which client it hosts
(message type "query"); after that, every reply from the node must be signed with that client
id (the endpoint's sender check), so a node cannot answer for another client.

Ray, which Flower's simulation engine uses, binds a non-loopback address unless
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` is set before it is imported: `loopback_environment`
sets that and keeps Flower's files inside the directory you name.
"""

from __future__ import annotations

import json
import os
import tempfile
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

from securegmi.adapters.loopback import SAFETY_ENV
from securegmi.config import SimulationConfig
from securegmi.core import fine_clusters as fc
from securegmi.core.mixture import divide_aggregate
from securegmi.crypto.envelope import decrypt
from securegmi.crypto.keys import PUBLIC_FILE, PublicContext, SecretContext
from securegmi.crypto.release import release_decrypted
from securegmi.engine.federated import Federation, ProtocolBuilder, play_round, privacy_summary
from securegmi.engine.loop import Loop, new_model
from securegmi.engine.participant import Client
from securegmi.engine.run import RELEASE_PRECISION, RunResult
from securegmi.engine.rundir import (
    AGGREGATE,
    CLIENT_STATES,
    CONFIG,
    ENGINE,
    LEDGERS,
    RESULTS,
    TRANSCRIPT,
    RunDirectory,
)
from securegmi.engine.secure_server import SecureAggregationServer
from securegmi.engine.server import AggregationServer
from securegmi.engine.statistics import identifier_from_state
from securegmi.engine.transport import Exchange, ServerEndpoint, Transport
from securegmi.errors import (
    BudgetExceededError,
    ConfigError,
    CryptoError,
    ProtocolViolation,
    RunAbortedError,
)
from securegmi.privacy.ledger import PrivacyLedger
from securegmi.protocol import SERVER, TranscriptWriter, read_transcript
from securegmi.protocol import Message as SecureGMIMessage

RECORD, WIRE, CLIENT_ID = "securegmi", "wire", "client-id"
QUERY, TRAIN = "query", "train"
REFUSED = 1  # Flower error code of a client that refused to answer (its checks or its ledger)

ClientFactory = Callable[[Context], Client]


def loopback_environment(home: Path) -> None:
    """Keep Flower and Ray on 127.0.0.1 with Flower's files under `home`; call it before Flower
    starts Ray."""
    ray = home / "ray"
    # Ray's session sockets live about 70 characters below its temp dir, and a Unix socket path
    # may not exceed 107 bytes: a deep `home` gets a short private directory instead.
    if len(str(ray)) > 36:
        ray = Path(tempfile.mkdtemp(prefix="sg-ray-"))
    for path in (home / "flwr", ray):
        path.mkdir(parents=True, exist_ok=True)
    os.environ.update({**SAFETY_ENV, "FLWR_HOME": str(home / "flwr"), "RAY_TMPDIR": str(ray)})


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
    arrays: dict[str, np.ndarray]
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
            save_aggregate(plan.run_dir.file(AGGREGATE), plan.server)
            summary = {
                "rounds": plan.rounds,
                "wall_seconds": time.perf_counter() - started,
                "refused": refusals,
            }
            plan.run_dir.write_json(ENGINE, summary)

    return app


# --- The embedded study (`securegmi simulate`'s data and protocol), carried by Flower. ---


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
    ledgers = run_dir / LEDGERS
    return federation.client(
        index,
        keys,
        ledgers if federation.plan is not None else None,
        state_path=run_dir / CLIENT_STATES / f"{cid}.safetensors",
    )


def study_server(
    config: SimulationConfig,
    builder: ProtocolBuilder,
    run_dir: Path,
    public_key: Path | None,
    overwrite: bool = False,
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
    directory = RunDirectory(run_dir, overwrite=overwrite)
    directory.write_json(CONFIG, config.to_dict())
    federation.write_public_files(directory)
    loop = Loop(config, federation.data, None, None)
    return ServerSetup(
        federation.server(public),
        ServerEndpoint(federation.spec, TranscriptWriter(directory.file(TRANSCRIPT))),
        directory,
        len(federation.client_ids),
        federation.rounds,
        loop.temperature,
    )


def study_apps(
    config: SimulationConfig,
    builder: ProtocolBuilder,
    run_dir: Path,
    key_dir: Path | None = None,
    overwrite: bool = False,
) -> tuple[ServerApp, ClientApp]:
    """ServerApp and ClientApp of the embedded study for Flower's simulation engine, where every
    node shares this machine (`flwr.simulation.run_simulation(..., num_supernodes=config.clients)`).
    The run directory gets the same files as an in-process run's server side, plus each
    client's state, and `flower.json`."""
    run_dir = Path(run_dir)

    def make_client(context: Context) -> Client:
        return study_client(config, builder, run_dir, int(context.node_config["partition-id"]), key_dir)

    def make_server(context: Context) -> ServerSetup:
        public = key_dir / PUBLIC_FILE if key_dir is not None else None
        return study_server(config, builder, run_dir, public, overwrite)

    return server_app(make_server), client_app(make_client)


# Configs for `flwr run` (deployment engine). Run config: `study` (a SimulationConfig as JSON),
# `run-dir` (the server's), `public-key` (secure only). Node config: `partition-id`, `state-dir`
# (the node's own directory: its state and ledger), `key-dir` (secure only). `protocols` maps a
# protocol name to its builder (`securegmi.protocols.builder`).


def configured_client_app(protocols: Callable[[str], ProtocolBuilder]) -> ClientApp:
    """The embedded study's ClientApp, configured by Flower's run and node configs."""

    def make_client(context: Context) -> Client:
        config = study_config(context.run_config)
        node = context.node_config
        key_dir = Path(str(node["key-dir"])) if node.get("key-dir") else None
        state_dir = Path(str(node["state-dir"]))
        return study_client(config, protocols(config.protocol), state_dir, int(node["partition-id"]), key_dir)

    return client_app(make_client)


def configured_server_app(protocols: Callable[[str], ProtocolBuilder]) -> ServerApp:
    """The embedded study's ServerApp, configured by Flower's run config."""

    def make_server(context: Context) -> ServerSetup:
        config = study_config(context.run_config)
        public = str(context.run_config.get("public-key", ""))
        run_dir = Path(str(context.run_config["run-dir"]))
        return study_server(config, protocols(config.protocol), run_dir, Path(public) if public else None)

    return server_app(make_server)


def run_flower_simulation(
    config: SimulationConfig,
    builder: ProtocolBuilder,
    out: Path,
    *,
    overwrite: bool = False,
    verbose: bool = False,
) -> RunResult:
    """The embedded study on Flower's simulation engine (Ray, kept on 127.0.0.1), one simulated
    SuperNode per client. `out` gets the run directory of an in-process run, without per-round
    metrics (the server cannot evaluate), plus client states and `flower.json`.

    The key ceremony writes the clients' secret context to a private temporary directory that
    only the ClientApps read, and that is deleted afterwards; the final model is evaluated by
    this harness playing a client (it decrypts the aggregate), as in-process.
    """
    started = time.perf_counter()
    out = Path(out)
    federation = Federation.build(config, builder)
    with tempfile.TemporaryDirectory(prefix="securegmi-") as scratch:
        keys = None
        key_dir = None
        if federation.secure:
            keys = SecretContext.generate(federation.ckks_parameters())
            key_dir = Path(scratch) / "keys"
            keys.save(key_dir)
        loopback_environment(Path(scratch))
        from flwr.simulation import run_simulation

        # Refuse a used directory before Ray starts, not inside the ServerApp.
        RunDirectory(out, overwrite=overwrite)
        server, client = study_apps(config, builder, out, key_dir, overwrite=True)
        cpus = os.cpu_count() or 1
        run_simulation(
            server_app=server,
            client_app=client,
            num_supernodes=len(federation.client_ids),
            backend_config={
                "client_resources": {"num_cpus": 1},
                "init_args": {"num_cpus": cpus, "include_dashboard": False},
            },
            verbose_logging=verbose,
        )
    if not (out / AGGREGATE).exists():
        raise RunAbortedError(f"the Flower run did not finish: {out} has no {AGGREGATE} (see the log above)")
    sums, masses = load_aggregate(out / AGGREGATE, keys)
    model = new_model(config, federation.data)
    k, p = model.n_components, model.parameter_count()
    components = divide_aggregate(sums.reshape(k, p), masses, model.get_component_vectors())
    if federation.secure:
        components = release_decrypted(components, RELEASE_PRECISION).astype(np.float32)
    model.set_component_vectors(components)
    states = [load_file(str(out / CLIENT_STATES / f"{cid}.safetensors")) for cid in federation.client_ids]
    pis = [state["pi"] for state in states]
    loop = Loop(config, federation.data, None, None)
    if federation.statistics is not None:  # the harness plays a client: it rebuilds the identifier
        stats = federation.statistics
        sketch = fc.public_sketch(federation.data.data_dim, stats.sketch_dim, stats.sketch_seed)
        loop.identifier = identifier_from_state(stats, states[0], sketch)
    evaluation = loop.evaluate([model] * len(pis), pis, final=True)
    privacy = None
    if federation.plan is not None:
        ledgers = [PrivacyLedger.load(out / LEDGERS / f"{cid}.json") for cid in federation.client_ids]
        privacy = privacy_summary(config, federation.plan, ledgers)
    uplink = sum(
        row.get("bytes", 0)
        for row in read_transcript(out / TRANSCRIPT)
        if row["receiver"] == SERVER and row["status"] == "delivered" and row["field"] is not None
    )
    result = RunResult(
        config,
        federation.spec.name,
        evaluation,
        (),
        uplink / max(1, federation.rounds * len(pis)),
        time.perf_counter() - started,
        federation.data.source_names,
        privacy,
    )
    run_dir = RunDirectory.existing(out)
    run_dir.save_checkpoint(components, np.stack(pis), {"method": config.method, "seed": str(config.seed)})
    run_dir.write_json(RESULTS, {**result.to_dict(), "engine": "flower-simulation"})
    return result
