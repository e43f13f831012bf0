"""securegmi's embedded study (`securegmi simulate`'s data and protocol) carried by Flower:
the apps of the simulation engine, the apps `flwr run` configures for the deployment engine,
and `run_flower_simulation`. The Flower glue itself is in `flower` (the only flwr import)."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from securegmi.adapters.deployment import export_deployment, study_client
from securegmi.adapters.flower import (
    ClientApp,
    Context,
    ServerApp,
    ServerSetup,
    client_app,
    ray_environment,
    server_app,
    simulation_engine,
)
from securegmi.config import SimulationConfig
from securegmi.crypto.keys import PUBLIC_FILE, PublicContext
from securegmi.crypto.signing import SignerRegistry
from securegmi.errors import ConfigError, CryptoError
from securegmi.federation.client import Client
from securegmi.files import KEY_FILE, read_bytes
from securegmi.records.rundir import CONFIG, SIGNERS, TRANSCRIPT, RunDirectory
from securegmi.simulation.recorder import Recorder
from securegmi.simulation.runner import RunResult, key_ceremony, signing_ceremony
from securegmi.simulation.study import Federation


def study_config(run_config: Mapping[str, Any]) -> SimulationConfig:
    try:
        return SimulationConfig.from_dict(json.loads(str(run_config["study"])))
    except (KeyError, json.JSONDecodeError) as exc:
        raise ConfigError(f"the Flower run config needs 'study', a SimulationConfig as JSON ({exc})") from exc


def study_server(
    config: SimulationConfig,
    run_dir: Path,
    public_key: Path | None,
    overwrite: bool = False,
    signers: Path | None = None,
) -> ServerSetup:
    """The server of the embedded study; it reads the public CKKS context only, and with
    `signers` (the registry of the clients' signing keys) accepts only signed replies and keeps
    a copy of the registry beside its transcript."""
    federation = Federation.build(config)
    public = None
    if federation.secure:
        if public_key is None or public_key.name != PUBLIC_FILE:
            raise CryptoError(
                f"the secure protocol's server needs the ceremony's {PUBLIC_FILE} ('public-key')"
            )
        public = PublicContext(read_bytes(public_key, KEY_FILE, CryptoError), federation.ckks_parameters())
    registry = SignerRegistry.load(signers) if signers is not None else None
    directory = RunDirectory(run_dir, overwrite=overwrite)
    directory.write_json(CONFIG, config.to_dict())
    federation.write_public_files(directory)
    if registry is not None:
        registry.save(directory.file(SIGNERS))
    recorder = Recorder(config, federation.data, None, None)
    return ServerSetup(
        federation.server(public, directory.file(TRANSCRIPT), registry),
        directory,
        len(federation.client_ids),
        federation.rounds,
        recorder.temperature,
    )


def study_apps(
    config: SimulationConfig,
    run_dir: Path,
    key_dir: Path | None = None,
    overwrite: bool = False,
) -> tuple[ServerApp, ClientApp]:
    """ServerApp and ClientApp of the embedded study for Flower's simulation engine, where every
    node shares this machine (`flwr.simulation.run_simulation(..., num_supernodes=config.clients)`).
    The run directory gets the same files as an in-process run's server side, plus each
    client's state, and `engine.json`."""
    run_dir = Path(run_dir)

    def make_client(context: Context) -> Client:
        return study_client(config, run_dir, int(context.node_config["partition-id"]), key_dir)

    def make_server(context: Context) -> ServerSetup:
        secure = key_dir is not None and (key_dir / PUBLIC_FILE).exists()
        public = key_dir / PUBLIC_FILE if key_dir is not None and secure else None
        signers = key_dir / SIGNERS if key_dir is not None and (key_dir / SIGNERS).exists() else None
        return study_server(config, run_dir, public, overwrite, signers)

    return server_app(make_server), client_app(make_client)


# Configs for `flwr run` (deployment engine). Run config: `study` (a SimulationConfig as JSON),
# `run-dir` (the server's), `public-key` (secure only), `signers` (optional: the registry of the
# clients' signing keys; the server then accepts only signed replies). Node config:
# `partition-id`, `state-dir` (the node's own directory: its state and ledger), `key-dir`
# (secure, or where the node keeps its signing key `<client>.ed25519`). The protocol is the one
# the study names, found in the registry.


def configured_client_app() -> ClientApp:
    """The embedded study's ClientApp, configured by Flower's run and node configs."""

    def make_client(context: Context) -> Client:
        config = study_config(context.run_config)
        node = context.node_config
        key_dir = Path(str(node["key-dir"])) if node.get("key-dir") else None
        state_dir = Path(str(node["state-dir"]))
        return study_client(config, state_dir, int(node["partition-id"]), key_dir)

    return client_app(make_client)


def configured_server_app() -> ServerApp:
    """The embedded study's ServerApp, configured by Flower's run config."""

    def make_server(context: Context) -> ServerSetup:
        config = study_config(context.run_config)
        public = str(context.run_config.get("public-key", ""))
        signers = str(context.run_config.get("signers", ""))
        run_dir = Path(str(context.run_config["run-dir"]))
        return study_server(
            config, run_dir, Path(public) if public else None, signers=Path(signers) if signers else None
        )

    return server_app(make_server)


def run_flower_simulation(
    config: SimulationConfig,
    out: Path,
    *,
    overwrite: bool = False,
    verbose: bool = False,
    ray_address: str | None = None,
) -> RunResult:
    """The embedded study on Flower's simulation engine, one simulated SuperNode per client.
    `out` gets the run directory of an in-process run, without per-round metrics (the server
    cannot evaluate), plus client states and `engine.json`.

    Without `ray_address`, Flower starts a Ray on this machine, kept on 127.0.0.1. With it, the
    SuperNodes run on that Ray cluster's workers, which write the client states and ledgers into
    `out` and read the clients' keys from the scratch directory (`tempfile`, so `TMPDIR`): on a
    cluster of several machines both must be one shared file system at the same path on every
    node, and every node needs this environment (securegmi and its torch).

    The key ceremony writes the clients' secret context to a private temporary directory that
    only the ClientApps read, and that is deleted afterwards; the final model is evaluated by
    this harness playing client 0 from its saved state (it decrypts the final aggregate), as
    in-process.
    """
    started = time.perf_counter()
    out = Path(out)
    federation = Federation.build(config)
    with tempfile.TemporaryDirectory(prefix="securegmi-") as scratch:
        key_dir = Path(scratch) / "keys"
        key_ceremony(federation, key_dir if federation.secure else None)
        # Every client's signing key beside it (the ClientApps read their own), the registry
        # for the server.
        signing_ceremony(federation.client_ids, key_dir, key_dir / SIGNERS)
        ray_environment(Path(scratch), ray_address)
        # Refuse a used directory before Ray starts, not inside the ServerApp.
        RunDirectory(out, overwrite=overwrite)
        server, client = study_apps(config, out.resolve(), key_dir, overwrite=True)
        simulation_engine(server, client, len(federation.client_ids), verbose, ray_address)
        # The simulation engine's one directory is the server's and every site's: the harness
        # plays client 0, which holds the key, as in-process.
        return export_deployment(
            out, [out], out, key_dir=key_dir, engine="flower-simulation", started=started
        )
