"""Run one simulated study: every method side by side on the same generated clients."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from securegmi.config import SimulationConfig
from securegmi.core.mixture import MixtureOfVAEs
from securegmi.crypto.keys import SecretContext
from securegmi.crypto.signing import SignerRegistry, SigningKey
from securegmi.errors import ConfigError, RunDirectoryError
from securegmi.federation.client import Client
from securegmi.federation.codec import CkksCodec, ClearCodec, ClientCodec
from securegmi.federation.driver import play_rounds
from securegmi.federation.local import adopt_aggregate
from securegmi.federation.server import RoundOutcome, Server
from securegmi.federation.transport import ClientEndpoint, InProcessTransport, ServerEndpoint, Transport
from securegmi.files import JSON_FILE, STATE_FILE, read_json, safetensors_metadata
from securegmi.privacy.accounting import PRIMARY
from securegmi.privacy.calibration import DpPlan, PrivateMixturePlan
from securegmi.privacy.ledger import PrivacyLedger
from securegmi.protocol import Message
from securegmi.records.rundir import (
    CLIENT_KEYS,
    CLIENT_STATES,
    CONFIG,
    CONFIG_DIGEST,
    LEDGERS,
    PLAN,
    RESULTS,
    SERVER_STATE,
    SIGNERS,
    TRANSCRIPT,
    RunDirectory,
)
from securegmi.simulation.baselines import run_central_dp, run_central_em, run_local, run_oracle
from securegmi.simulation.evaluation import Evaluation
from securegmi.simulation.fedgmm import run_fedgmm
from securegmi.simulation.recorder import (
    EVALUATION_ONLY,
    PlanCallback,
    ProgressCallback,
    Recorder,
    RoundMetrics,
    evaluation_only,
)
from securegmi.simulation.study import Federation, dp_plan, load_federated_data

FEDERATED = ("fedgmi", "fedem-weights", "fedavg", "ifca")
# results.json's ground truth (recorder.EVALUATION_ONLY): the scores, the held-out NLL on the
# clients' test records, and every per-client row (true pi, estimate, accuracy, test size).
EVALUATION_ONLY_RESULTS = ("source_accuracy", "pi_tv_error", "nll", "per_client")
# What carries a federated run's messages, given the server's end and each client's (the way
# httpx's `Client(transport=...)` takes one): the in-process twin by default.
TransportFactory = Callable[[ServerEndpoint, Mapping[str, ClientEndpoint]], Transport]


def config_digest(config: SimulationConfig) -> str:
    """SHA-256 of the configuration's canonical JSON: what a run records at its start (in the
    server's state) so that `resume` can refuse a config.json edited since."""
    canonical = json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class RunResult:
    config: SimulationConfig
    protocol: str | None
    evaluation: Evaluation
    history: tuple[RoundMetrics, ...]
    uplink_bytes_per_client_round: float
    wall_seconds: float
    source_names: tuple[str, ...]
    privacy: dict[str, Any] | None = None  # epsilon target, delta, spent (RDP and PLD), noise

    def to_dict(self) -> dict[str, Any]:
        c = self.config
        return {
            "method": c.method,
            "protocol": self.protocol,
            "dataset": c.dataset,
            "sources": c.sources,
            "source_names": list(self.source_names),
            "clients": c.clients,
            "components": c.model_components,
            "rounds": c.planned_rounds,
            "seed": c.seed,
            "source_accuracy": self.evaluation.source_accuracy,
            "pi_tv_error": self.evaluation.pi_tv_error,
            "nll": self.evaluation.nll,
            "uplink_bytes_per_client_round": self.uplink_bytes_per_client_round,
            "wall_seconds": self.wall_seconds,
            "epsilon": self.privacy,  # None: no differential privacy
            "per_client": list(self.evaluation.per_client),
            EVALUATION_ONLY: evaluation_only(*EVALUATION_ONLY_RESULTS),
        }


def run_simulation(
    config: SimulationConfig,
    *,
    transport: TransportFactory = InProcessTransport,
    out: Path | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    on_plan: PlanCallback | None = None,
    resume: bool = False,
) -> RunResult:
    """Run one simulated study and, with `out`, write its run directory.

    Federated methods run the protocol the configuration names (found by name in
    `securegmi.protocol.registry`), their messages carried by `transport(server_end,
    client_ends)`; `local`, `central-em`, `oracle` and `central-dp` exchange no messages. A
    federated run with `out` saves
    the server's and every client's state after each round; `resume=True` continues a stopped
    run in `out` from its last saved round (`config` must be the one in its config.json).
    """
    started = time.perf_counter()
    run_dir: RunDirectory | None = None
    if resume:
        if out is None or config.method not in FEDERATED:
            raise ConfigError("only a federated run with a run directory can be resumed")
        run_dir = RunDirectory.resumable(out)
        check_resumed_config(run_dir, config)
    elif out is not None:
        RunDirectory.check_unused(out, overwrite=overwrite)  # refused before any work
    data = load_federated_data(config)
    # The data split and the DP plan come before the run directory: a plan that cannot be made
    # (an impossible epsilon or delta) leaves nothing behind in `out`.
    federation: Federation | None = None
    if config.method in FEDERATED:
        federation = Federation.build(config, data)
    if config.method == "central-dp":
        dp_plan(config, data)
    if out is not None and not resume:
        run_dir = RunDirectory(out, overwrite=overwrite)
        run_dir.write_json(CONFIG, config.to_dict())
    recorder = Recorder(config, data, run_dir, progress)
    spec_name: str | None = None
    privacy: dict[str, Any] | None = None
    uplink = 0.0
    exported: np.ndarray | None = None
    own: list[np.ndarray] | None = None
    if federation is not None:
        models, pis, own, uplink, privacy = run_federated(federation, recorder, on_plan, resume, transport)
        spec_name = federation.spec.name
        exported = federation.exported(models[0].get_component_vectors())
    elif config.method == "central-dp":
        models, pis, own, privacy = run_central_dp(recorder)
    elif config.method == "local":
        models, pis = run_local(recorder)
    elif config.method == "fedgmm":
        models, pis, uplink = run_fedgmm(recorder)
    else:
        models, pis = (run_oracle if config.method == "oracle" else run_central_em)(recorder)
        exported = models[0].get_component_vectors()
    return finish_run(
        recorder, run_dir, models, pis, exported, federation, spec_name, uplink, privacy, started, own_pis=own
    )


def finish_run(
    recorder: Recorder,
    run_dir: RunDirectory | None,
    models: list[MixtureOfVAEs],
    pis: list[np.ndarray],
    exported: np.ndarray | None,
    federation: Federation | None,
    protocol: str | None,
    uplink: float,
    privacy: dict[str, Any] | None,
    started: float,
    engine: str | None = None,
    *,
    own_pis: list[np.ndarray] | None = None,
) -> RunResult:
    """The final evaluation of a finished run, whichever engine ran it, and with `run_dir` its
    model (`exported`: the shared components, None for a method without one) and results.json
    (`engine` names an engine other than this process).

    `pis` are what the clients released, and the model keeps them; `own_pis`, where a private
    run's sites estimated their own (`Client.own_pi`), are what each site labels its own test
    records with, so the evaluation uses them, and they are written nowhere but results.json's
    ground-truth rows."""
    config = recorder.config
    result = RunResult(
        config,
        protocol,
        recorder.evaluate(models, pis if own_pis is None else own_pis, final=True),
        tuple(recorder.history),
        uplink,
        time.perf_counter() - started,
        recorder.data.source_names,
        privacy,
    )
    if run_dir is None:
        return result
    if exported is not None:  # one shared model: the federated methods and the central ones
        identifier = recorder.identifier
        extra = {} if identifier is None else identifier.arrays()
        mixtures = np.stack(pis)
        if federation is not None:
            extra = {name: federation.exported(v) for name, v in extra.items()}
            mixtures = federation.exported(mixtures)
        metadata = {"method": config.method, "seed": str(config.seed)}
        run_dir.save_checkpoint(exported, mixtures, metadata, extra)
    run_dir.write_json(RESULTS, result.to_dict() | ({} if engine is None else {"engine": engine}))
    return result


def key_ceremony(federation: Federation, key_dir: Path | None, resume: bool = False) -> SecretContext | None:
    """The key ceremony of a simulated run: the clients share the secret context, the server gets
    the public one only. With `key_dir` the clients' key is kept there (owner-only), as each
    Flower node keeps its key directory, so a stopped run resumes under the same key as the
    ciphertexts the server holds (`resume` loads it)."""
    if not federation.secure:
        return None
    if resume:
        if key_dir is None:
            raise ConfigError("a secure run resumes only under its clients' saved key")
        return SecretContext.load(key_dir, federation.ckks_parameters())
    keys = SecretContext.generate(federation.ckks_parameters())
    if key_dir is not None:
        keys.save(key_dir)
    return keys


def signing_ceremony(
    client_ids: list[str], key_dir: Path | None, registry_path: Path | None, resume: bool = False
) -> dict[str, SigningKey] | None:
    """Every client's Ed25519 signing key, and the registry of their public keys the study
    registers. With `key_dir` each key is kept there (owner-only: the clients' side, as each
    Flower node keeps its own), with `registry_path` the registry beside the server's records;
    `resume` loads both back. None for a resumed run started before signatures (none saved):
    it goes on unsigned, as it began."""
    if resume:
        if key_dir is None or not os.path.lexists(SigningKey.path_in(key_dir, client_ids[0])):
            if registry_path is not None and os.path.lexists(registry_path):
                raise RunDirectoryError(
                    f"{registry_path} registers the clients' signing keys, and {key_dir} holds none: a "
                    "signed run resumes only under the keys it was started with; restore them"
                )
            return None
        keys = {cid: SigningKey.load(key_dir, cid) for cid in client_ids}
        if registry_path is not None and SignerRegistry.load(registry_path) != SignerRegistry.of(keys):
            raise RunDirectoryError(
                f"{registry_path} is not the registry of the clients' saved signing keys ({key_dir}): "
                "a resumed run continues under the keys it was started with; restore the original files"
            )
        return keys
    keys = {cid: SigningKey.generate(cid) for cid in client_ids}
    if key_dir is not None:
        for key in keys.values():
            key.save(key_dir)
    if registry_path is not None:
        SignerRegistry.of(keys).save(registry_path)
    return keys


def conclude_run(
    federation: Federation, final: Client, last: Message, ledgers: list[PrivacyLedger]
) -> tuple[MixtureOfVAEs, dict[str, Any] | None]:
    """The final model, what `final` holds once it takes in the server's `last` aggregate (the
    averaged components, or split DP-SGD's last step), and the run's privacy summary from the
    clients' `ledgers`."""
    final.conclude(last)
    plan = federation.plan
    return final.components, None if plan is None else privacy_summary(federation.config, plan, ledgers)


def own_pis(
    federation: Federation, final: Client, others: Iterable[Client], last: Message
) -> list[np.ndarray] | None:
    """Under the statistics design, the pi each client estimates for itself once it holds the
    final model (`Client.own_pi`): `final` (the first client), which took in the server's `last`
    aggregate already (`conclude_run`), then each of `others`, which takes it in here.

    None otherwise: without a plan a client's pi never was a release and already is its own;
    under the em design the own pi (from the VAEs' ELBOs) was worse than the released one
    (digits, epsilon 8, seeds 10-11: pi TV 0.515 -> 0.588 and 0.440 -> 0.614, accuracy equal;
    bench/results/own_pi.json)."""
    if not isinstance(federation.plan, PrivateMixturePlan):
        return None
    own = [final.own_pi()]
    for client in others:
        client.conclude(last)
        own.append(client.own_pi())
    return own


def run_federated(
    federation: Federation,
    recorder: Recorder,
    on_plan: PlanCallback | None,
    resume: bool = False,
    transport_factory: TransportFactory = InProcessTransport,
) -> tuple[list[MixtureOfVAEs], list[np.ndarray], list[np.ndarray] | None, float, dict[str, Any] | None]:
    """The clients and the server exchanging protocol messages in this process: the final
    model, the clients' released pis, their own (`own_pis`), uplink bytes per client and round,
    and the privacy summary."""
    plan, run_dir = federation.plan, recorder.run_dir
    ledger_dir = run_dir.file(LEDGERS) if run_dir is not None and plan is not None else None
    if run_dir is not None and not resume:
        federation.write_public_files(run_dir)
    key_dir = run_dir.file(CLIENT_KEYS) if run_dir is not None else None
    keys = key_ceremony(federation, key_dir, resume)
    signing = signing_ceremony(
        federation.client_ids, key_dir, run_dir.file(SIGNERS) if run_dir is not None else None, resume
    )

    def state_of(cid: str) -> Path | None:
        return run_dir.file(CLIENT_STATES) / f"{cid}.safetensors" if run_dir is not None else None

    clients = {
        cid: federation.client(
            i, keys, ledger_dir, state_path=state_of(cid), signing_key=(signing or {}).get(cid)
        )
        for i, cid in enumerate(federation.client_ids)
    }
    transcript = run_dir.file(TRANSCRIPT) if run_dir is not None else None
    # The server holds the registry of public keys only, never a client's signing key.
    signers = None if signing is None else SignerRegistry.of(signing)
    server = federation.server(keys.public() if keys is not None else None, transcript, signers)
    # The harness plays a client to evaluate: it opens each aggregate as a client would.
    harness: ClientCodec = CkksCodec(keys) if keys is not None else ClearCodec()
    reference = federation.new_model()
    transport = transport_factory(server.endpoint, {cid: client.endpoint for cid, client in clients.items()})
    uplink_total, start = 0, 0
    server_state = run_dir.file(SERVER_STATE) if run_dir is not None else None
    digest = {CONFIG_DIGEST: config_digest(federation.config)}  # kept with every saved round
    if server_state is not None and resume:
        check_resumed_plan(run_dir, plan)
        saved = server.load_state(server_state)
        start, uplink_total = int(saved["next_round"]), int(saved["uplink"])
        recorder.resume(start)
        if start > 0:  # the harness's model: what the last saved round's sums give
            open_model(server, harness, reference, start)
    elif server_state is not None:  # the run id, before any client joins the run
        server.save_state(server_state, {"next_round": "0", "uplink": "0", **digest})
    stats_rounds = federation.statistics.rounds if federation.statistics is not None else 0
    # Shown once every party is built (a resumed run's states and ledgers read back), so that a
    # run refused while it is set up says so in one line.
    if plan is not None and on_plan is not None:
        on_plan(plan.to_dict())
    round_started = time.perf_counter()

    def after_round(t: int, outcome: RoundOutcome) -> None:
        nonlocal uplink_total, round_started
        uplink_total += outcome.uplink_bytes
        if t >= stats_rounds:  # the statistics phase ends with the first VAE round
            recorder.identifier = next(iter(clients.values())).identifier
            open_model(server, harness, reference, t + 1)
            recorder.finish_round(
                t,
                round_started,
                [reference] * len(clients),
                # The pi the clients hold in the run (released, under DP); their own is
                # estimated once, at the end (own_pis), and scores only the final evaluation.
                [c.pi for c in clients.values()],
                outcome.uplink_bytes,
                len(outcome.refused) + len(outcome.rejected),
            )
        if server_state is not None:  # every client saved its state before it replied
            progress = {"next_round": str(t + 1), "uplink": str(uplink_total)}
            server.save_state(server_state, progress | digest)
        round_started = time.perf_counter()

    play_rounds(
        server, transport, list(clients), range(start, federation.rounds), recorder.temperature, after_round
    )
    per_client_round = uplink_total / max(1, federation.rounds * len(clients))
    ledgers = [c.ledger for c in clients.values() if c.ledger is not None]
    final = next(iter(clients.values()))
    last = server.broadcast(federation.rounds, 1.0)
    model, summary = conclude_run(federation, final, last, ledgers)
    own = own_pis(federation, final, list(clients.values())[1:], last)
    return [model] * len(clients), [c.pi for c in clients.values()], own, per_client_round, summary


def check_resumed_config(run_dir: RunDirectory, config: SimulationConfig) -> None:
    """`RunDirectoryError` unless `config` is the configuration the run in `run_dir` started
    with: the digest its first saved state recorded (and every later one kept)."""
    path = run_dir.file(SERVER_STATE)
    recorded = safetensors_metadata(path, STATE_FILE).get(CONFIG_DIGEST)
    if recorded is None:
        raise RunDirectoryError(
            f"{path} records no digest of the run's configuration (an older securegmi started it), so "
            f"{CONFIG} cannot be checked against the run; start the run again with --overwrite"
        )
    if recorded != config_digest(config):
        raise RunDirectoryError(
            f"{run_dir.file(CONFIG)} is not the configuration this run started with (its digest differs "
            f"from the one {SERVER_STATE} recorded): a resumed run must continue the same study; "
            "restore the original config.json, or start a new run"
        )


def check_resumed_plan(run_dir: RunDirectory | None, plan: DpPlan | PrivateMixturePlan | None) -> None:
    """`RunDirectoryError` unless this version of securegmi plans the run as the one that started
    it did: the configuration digest cannot see a new version's design (its moments weights, say),
    and a run continued under another plan would release what its ledgers do not describe."""
    if plan is None or run_dir is None:
        return
    recorded = read_json(run_dir.file(PLAN), JSON_FILE)
    if recorded != json.loads(json.dumps(plan.to_dict())):
        raise RunDirectoryError(
            f"{run_dir.file(PLAN)} is not the plan this version of securegmi makes for the run's "
            "configuration (an upgrade changed the private design since the run started): finish it "
            "with the version that started it, or start a new run"
        )


def open_model(server: Server, codec: ClientCodec, model: MixtureOfVAEs, round_index: int) -> None:
    """`model` set to what a client holds after opening the server's next broadcast."""
    message = server.broadcast(round_index, 1.0)
    adopt_aggregate(model, codec.open(message, server.spec))


def privacy_summary(
    config: SimulationConfig, plan: DpPlan | PrivateMixturePlan, ledgers: list[PrivacyLedger]
) -> dict[str, Any]:
    summary = {
        "target": plan.epsilon,
        "delta": plan.delta,
        # PLD, the figure held to the budget; RDP the cross-check (above the budget for a plan
        # calibrated on PLD: RDP's looseness, not an overspend).
        "accountant": str(PRIMARY),
        "max_spent": max(ledger.spent for ledger in ledgers),
        "max_spent_rdp": max(ledger.spent_rdp for ledger in ledgers),
        # Against the server colluding with one client (split noise); equal to max_spent otherwise.
        "max_spent_fallback": max(ledger.spent_fallback for ledger in ledgers),
        "placement": config.placement,
        "design": config.private_training,
        "sgd_noise_multiplier": plan.sgd_noise_multiplier,
        # ChaCha20 keyed from OS entropy, unless a test seeded the noise (privacy.noise).
        "secure_rng": config.dp_noise == "private",
        "noise": config.dp_noise,
    }
    if isinstance(plan, DpPlan):
        summary["count_noise_multiplier"] = plan.count_noise_multiplier
    else:
        s = plan.statistics
        summary |= {
            "moments_noise_multiplier": s.moments_noise,
            "cluster_noise_multiplier": s.cluster_noise,
            "histogram_noise_multiplier": s.histogram_noise,
            "min_clients": s.min_clients,
            "sgd_placement": plan.sgd_placement,
            "identifier_steps": plan.identifier_steps,
            "identifier_noise_multiplier": plan.identifier_noise_multiplier,
        }
    return summary
