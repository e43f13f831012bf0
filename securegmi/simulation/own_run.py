"""`securegmi.save`: a run of your own loop written as a run directory, so that `load`,
`securegmi audit`, `infer` and `report` take it as they take a simulated one.

It writes what a simulated run writes, through the same writers (`RunDirectory`): config.json
(the run's public settings, marked dataset "own": the records and the architecture were the
user's), protocol.json and dp_plan.json, each client's ledger, the server's transcript and
state, the exported model and results.json. The audit then checks it as strictly: the ledgers
against the plan and the transcript, the cohort against the configuration. There is no ground
truth in a deployment, so results.json holds each client's estimated pi and no scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from securegmi.config import OWN_DATA, SimulationConfig
from securegmi.crypto.release import release_decrypted
from securegmi.errors import ConfigError
from securegmi.federation.client import Client
from securegmi.federation.server import Server
from securegmi.files import TRANSCRIPT_FILE, read_bytes, write_atomic
from securegmi.privacy.calibration import PrivateMixturePlan
from securegmi.records.rundir import (
    CONFIG,
    CONFIG_DIGEST,
    LEDGERS,
    RESULTS,
    SERVER_STATE,
    SIGNERS,
    TRANSCRIPT,
    RunDirectory,
)
from securegmi.simulation.runner import config_digest, privacy_summary
from securegmi.vocabulary import Placement, PrivateDesign


def save(run_dir: Path | str, clients: Sequence[Client], server: Server, *, overwrite: bool = False) -> Path:
    """Write the finished federation of `clients` and `server` (after `run_federation`, or
    your own rounds ending with every client's `conclude`) to `run_dir`; returns its path.

    The server must have been built with `transcript_path=`: the transcript is the audit's
    record of what left each client. `RunDirectoryError` for a directory that already holds a
    run (unless `overwrite`), `ConfigError` for a federation that did not finish."""
    if not clients:
        raise ConfigError("save needs the federation's clients")
    transcript = server.endpoint.transcript
    if transcript is None:
        raise ConfigError(
            "the server kept no transcript: build it with Server(..., transcript_path=...), the audit's "
            "record of what left each client"
        )
    if server.aggregated is None:
        raise ConfigError("the server aggregated no round: play the federation before saving it")
    rounds = server.aggregated + 1
    config = own_config(clients, server, rounds)
    path = Path(run_dir)
    source = transcript.path.resolve()
    # The server may have kept its transcript in the run directory already: nothing else there.
    own = path.is_dir() and [p.name for p in path.iterdir()] == [TRANSCRIPT]
    own = own and source == (path / TRANSCRIPT).resolve()
    RunDirectory.check_unused(path, overwrite=overwrite or own)
    record = read_bytes(source, TRANSCRIPT_FILE)  # before RunDirectory clears a stale transcript
    directory = RunDirectory(path, overwrite=overwrite or own)
    directory.write_json(CONFIG, config.to_dict())
    plan = clients[0].plan
    directory.write_public_files(server.spec, plan)
    write_atomic(directory.file(TRANSCRIPT), record)
    if server.endpoint.signers is not None:  # the registry the server checked every reply against
        server.endpoint.signers.save(directory.file(SIGNERS))
    for client in clients:
        if client.ledger is not None:
            client.ledger.save(directory.file(LEDGERS) / f"{client.client_id}.json")
    # No "uplink" figure: a loop of your own carries its bytes, this record does not count them.
    progress = {"next_round": str(rounds), CONFIG_DIGEST: config_digest(config)}
    server.save_state(directory.file(SERVER_STATE), progress)
    final = clients[0]
    exported = _exported(server, final.components.get_component_vectors())
    identifier = {} if final.identifier is None else final.identifier.arrays()
    mixtures = _exported(server, np.stack([c.pi for c in clients]))
    metadata = {"method": config.method, "seed": str(config.seed), "features": str(final.learner.x.shape[1])}
    directory.save_checkpoint(
        exported, mixtures, metadata, {name: _exported(server, v) for name, v in identifier.items()}
    )
    privacy = None
    if plan is not None:
        privacy = privacy_summary(config, plan, [c.ledger for c in clients if c.ledger is not None])
    directory.write_json(RESULTS, _results(config, server, clients, privacy))
    return directory.path


def own_config(clients: Sequence[Client], server: Server, rounds: int) -> SimulationConfig:
    """The public settings of a run of your own loop, as a `SimulationConfig` record with the
    dataset marked "own": what the audit checks its plan, protocol and cohort against."""
    first = clients[0]
    settings, privacy, spec = first.learner.settings, first.privacy, server.spec
    fields: dict[str, Any] = {
        "dataset": OWN_DATA,
        "method": "fedgmi",
        "protocol": spec.name,
        "clients": len(clients),
        "components": first.components.n_components,
        "seed": first.learner.seed,
        "batch_size": settings.batch_size,
        "elbo_samples": settings.elbo_samples,
        "e_step_iterations": settings.e_step_iterations,
        "pi_floor": settings.pi_floor,
        "top_b": settings.top_b,
    }
    if privacy is None:
        fields |= {
            "rounds": rounds,
            "local_epochs": settings.local_epochs,
            "learning_rate": settings.learning_rate,
        }
        return SimulationConfig(**fields)
    plan = privacy.plan
    per_epoch = max(1, round(1.0 / plan.sample_rate))
    if plan.steps_per_round < per_epoch or plan.steps_per_round % per_epoch:
        # config.json records DP-SGD's steps as local_epochs x round(1/q), the form the audit
        # re-derives the plan from: a plan it cannot express would be audited as another one.
        raise ConfigError(
            f"a saved run records DP-SGD steps per round as local_epochs x {per_epoch} "
            f"(round(1/sample_rate)); this plan takes {plan.steps_per_round}: calibrate with "
            f"steps_per_round a multiple of {per_epoch}"
        )
    noise = {c.ledger.noise_source for c in clients if c.ledger is not None}
    fields |= {
        "epsilon": plan.epsilon,
        "delta": plan.delta,
        "sample_rate": plan.sample_rate,
        "clip_norm": plan.clip_norm,
        "dp_learning_rate": settings.learning_rate,
        "dp_noise": "private" if noise == {"private"} else "seeded",
        "local_epochs": plan.steps_per_round // per_epoch,
        "dp_batch_normaliser": privacy.batch_normaliser,
    }
    if isinstance(plan, PrivateMixturePlan):
        stats = plan.statistics
        fields |= {
            "private_training": PrivateDesign.STATISTICS,
            "noise_placement": stats.placement,
            "min_clients": stats.min_clients,
            "statistics_share": plan.statistics_share,
            "fine_clusters": stats.clusters,
            "projection_dim": stats.projection_dim,
            "kmeans_iterations": stats.iterations,
            "vae_rounds": plan.vae_rounds,
            "sgd_placement": plan.sgd_placement,
            "identifier_steps": plan.identifier_steps,
        }
        if plan.identifier_steps:
            fields["identifier_share"] = plan.identifier_share
    else:
        fields |= {
            "private_training": PrivateDesign.EM,
            "noise_placement": Placement.LOCAL,
            "rounds": plan.rounds,
            "count_share": plan.count_share,
        }
    return SimulationConfig(**fields)


def _exported(server: Server, values: np.ndarray) -> np.ndarray:
    """Under CKKS, exported values rounded to the release grid their aggregates passed on
    decryption (as a simulated secure run exports them)."""
    grid = server.release_grid()
    return values if grid is None else release_decrypted(values, grid).astype(values.dtype)


def _results(
    config: SimulationConfig, server: Server, clients: Sequence[Client], privacy: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        "engine": "own-loop",
        "method": config.method,
        "protocol": server.spec.name,
        "dataset": OWN_DATA,
        "clients": len(clients),
        "components": config.components,
        "rounds": config.planned_rounds,
        "seed": config.seed,
        "epsilon": privacy,  # None: no differential privacy
        # A deployment holds no ground truth: each client's estimate, and no scores.
        "per_client": [{"client": c.client_id, "pi_estimate": c.pi.tolist()} for c in clients],
    }
