"""The records of the embedded study run on Flower, made one run directory that `load`,
`securegmi audit`, `infer` and `report` take as they take an in-process run's.

A Flower server's directory holds the public records (config, protocol, plan, transcript,
engine summary) and the final aggregate as wire bytes: under the secure protocol ciphertexts,
which the server cannot open. Each site keeps its own state (its pi) and ledger, and a site
holds the CKKS key. `export_deployment` is what a key-holding site runs at the end: it takes in
the final aggregate as its client would (`conclude`), gathers every site's ledger and pi (and,
for the evaluation only, each site's own pi, `Client.own_pi`, from its client rebuilt from its
state), and writes the run directory through the same finishing step as every other engine
(`simulation.runner.finish_run`). The simulation engine ends with it too, so both Flower
engines leave the same run directory. No flwr import here: exporting needs no Flower.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from securegmi.config import SimulationConfig
from securegmi.crypto.keys import SecretContext
from securegmi.crypto.signing import SigningKey
from securegmi.errors import ConfigError, CryptoError, RunAbortedError, RunDirectoryError
from securegmi.federation.client import Client
from securegmi.files import (
    JSON_FILE,
    LEDGER_FILE,
    STATE_FILE,
    TRANSCRIPT_FILE,
    read_bytes,
    read_json,
    safetensors_arrays,
    write_atomic,
)
from securegmi.privacy.ledger import PrivacyLedger
from securegmi.protocol import SERVER, decode, read_transcript
from securegmi.records.rundir import (
    AGGREGATE,
    CLIENT_STATES,
    CONFIG,
    ENGINE,
    LEDGERS,
    PLAN,
    PROTOCOL,
    SIGNERS,
    TRANSCRIPT,
    RunDirectory,
)
from securegmi.simulation.recorder import Recorder
from securegmi.simulation.runner import RunResult, conclude_run, finish_run, own_pis
from securegmi.simulation.study import Federation

# The server's public records an exported run directory carries, as the server wrote them.
SERVER_RECORDS = (PROTOCOL, PLAN, TRANSCRIPT, ENGINE, AGGREGATE, SIGNERS)


@functools.lru_cache(maxsize=2)
def study_federation(config: SimulationConfig) -> Federation:
    """Flower builds the client anew for every message, and a simulation engine's worker process
    serves many messages of one study: the federation (data, split, DP plan) is a function of
    the configuration alone, so a process builds it once (about 0.9 s each time otherwise); the
    client itself is still rebuilt from its saved state per message."""
    return Federation.build(config)


def study_client(config: SimulationConfig, site_dir: Path, index: int, key_dir: Path | None) -> Client:
    """Client `index` of the embedded study, with its state and ledger under `site_dir`, and,
    where `key_dir` holds them, the clients' CKKS key and this client's signing key."""
    federation = study_federation(config)
    keys = None
    if federation.secure:
        if key_dir is None:
            raise CryptoError("the secure protocol needs the site's key directory ('key-dir')")
        keys = SecretContext.load(key_dir, federation.ckks_parameters())
    cid = federation.client_ids[index]
    signing = None
    if key_dir is not None and os.path.lexists(SigningKey.path_in(key_dir, cid)):
        signing = SigningKey.load(key_dir, cid)
    return federation.client(
        index,
        keys,
        site_dir / LEDGERS if federation.plan is not None else None,
        state_path=site_dir / CLIENT_STATES / f"{cid}.safetensors",
        signing_key=signing,
    )


def read_config(server_dir: Path) -> SimulationConfig:
    stored = read_json(Path(server_dir) / CONFIG, JSON_FILE)
    if not isinstance(stored, dict):
        raise RunDirectoryError(f"{server_dir / CONFIG} does not hold a configuration object")
    return SimulationConfig.from_dict(stored)


def _site_of(federation: Federation, sites: Sequence[Path]) -> dict[str, Path]:
    """{client id: the site directory holding its state}, for every client of the study."""
    found: dict[str, Path] = {}
    for site in map(Path, sites):
        states = sorted((site / CLIENT_STATES).glob("*.safetensors"))
        if not states:
            raise RunDirectoryError(f"{site} holds no {CLIENT_STATES}/: not a site's directory of this study")
        for state in states:
            if state.stem not in federation.client_ids:
                raise RunDirectoryError(f"{state} is the state of {state.stem!r}, not a client of this study")
            if state.stem in found and found[state.stem] != site:
                raise RunDirectoryError(f"{state.stem} has a state in both {found[state.stem]} and {site}")
            found[state.stem] = site
    missing = [cid for cid in federation.client_ids if cid not in found]
    if missing:
        raise ConfigError(
            f"no site directory holds the state of {', '.join(missing)}: give every site's directory "
            "(its client-states/ and ledgers/), since the run's model records every client's pi"
        )
    return found


def export_deployment(
    server_dir: Path,
    sites: Sequence[Path],
    out: Path,
    *,
    key_dir: Path | None = None,
    overwrite: bool = False,
    engine: str = "flower-deployment",
    started: float | None = None,
) -> RunResult:
    """The run directory `out` of the Flower run whose server wrote `server_dir` and whose
    clients kept their states and ledgers in `sites` (one directory per site, or one for
    several). The first client's site opens the final aggregate with the key in `key_dir`
    (needed under the secure protocol), as that site's client would at the end of the run;
    `out` may be `server_dir` itself (the simulation engine's one directory).

    `RunAbortedError` if the server did not finish (no final aggregate), `ConfigError` for a
    missing site or key, `RunDirectoryError` for a used `out` (unless `overwrite`)."""
    started = time.perf_counter() if started is None else started
    server_dir, out = Path(server_dir), Path(out)
    if not os.path.lexists(server_dir / AGGREGATE):
        raise RunAbortedError(
            f"the Flower run did not finish: {server_dir} has no {AGGREGATE} (see the server's log)"
        )
    config = read_config(server_dir)
    federation = study_federation(config)
    where = _site_of(federation, sites)
    final = study_client(config, where[federation.client_ids[0]], 0, key_dir)
    ledgers = []
    if federation.plan is not None:
        ledgers = [PrivacyLedger.load(where[cid] / LEDGERS / f"{cid}.json") for cid in federation.client_ids]
    aggregate = decode(read_bytes(server_dir / AGGREGATE, STATE_FILE))
    model, privacy = conclude_run(federation, final, aggregate, ledgers)
    pis = [_pi(where[cid] / CLIENT_STATES / f"{cid}.safetensors") for cid in federation.client_ids]
    # Each site's own pi, as that site's client computes it from its state once it takes in the
    # final aggregate: the evaluation's, never the model's.
    others = (
        study_client(config, where[cid], i, key_dir) for i, cid in enumerate(federation.client_ids) if i > 0
    )
    own = own_pis(federation, final, others, aggregate)
    uplink = sum(
        row.get("bytes", 0)
        for row in read_transcript(server_dir / TRANSCRIPT)
        if row["receiver"] == SERVER and row["status"] == "delivered" and row["field"] is not None
    )
    if out.resolve() == server_dir.resolve():
        directory = RunDirectory.existing(out)
    else:
        directory = _copy_server_records(server_dir, out, config, overwrite)
    for cid in federation.client_ids if federation.plan is not None else ():
        # The audit reads the ledgers beside the transcript: each as its site wrote it.
        source, target = where[cid] / LEDGERS / f"{cid}.json", directory.file(LEDGERS) / f"{cid}.json"
        if source.resolve() != target.resolve():
            write_atomic(target, read_bytes(source, LEDGER_FILE))
    recorder = Recorder(config, federation.data, None, None)
    recorder.identifier = final.identifier
    return finish_run(
        recorder,
        directory,
        [model] * len(pis),
        pis,
        federation.exported(model.get_component_vectors()),
        federation,
        federation.spec.name,
        uplink / max(1, federation.rounds * len(pis)),
        privacy,
        started,
        engine,
        own_pis=own,
    )


def _pi(state: Path) -> np.ndarray:
    arrays, _ = safetensors_arrays(read_bytes(state, STATE_FILE), state)
    if "pi" not in arrays:
        raise RunDirectoryError(f"{state} holds no pi: not a client state securegmi wrote")
    pi: np.ndarray = np.asarray(arrays["pi"], dtype=np.float64)
    return pi


def _copy_server_records(
    server_dir: Path, out: Path, config: SimulationConfig, overwrite: bool
) -> RunDirectory:
    """A new run directory holding the server's public records, byte for byte."""
    directory = RunDirectory(out, overwrite=overwrite)
    directory.write_json(CONFIG, config.to_dict())
    for name in SERVER_RECORDS:
        source = server_dir / name
        if os.path.lexists(source):
            kind = TRANSCRIPT_FILE if name == TRANSCRIPT else STATE_FILE if name == AGGREGATE else JSON_FILE
            write_atomic(directory.file(name), read_bytes(source, kind))
    if os.path.lexists(server_dir / PLAN):  # a private run: its ledgers are gathered here
        directory.file(LEDGERS).mkdir(exist_ok=True)
    return directory
