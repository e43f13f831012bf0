"""The simulation run loop: every method side by side on the same generated clients."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from securegmi.config import SimulationConfig
from securegmi.core.em import infer_mixture, temperature_at
from securegmi.core.mixture import MixtureOfVAEs
from securegmi.core.training import e_step_elbo, train_components
from securegmi.crypto.envelope import decrypt
from securegmi.crypto.keys import SecretContext
from securegmi.crypto.params import CkksParameters
from securegmi.crypto.release import release_decrypted
from securegmi.data.datasets import load_dataset
from securegmi.data.mixture import FederatedData, make_federated_data
from securegmi.engine.client import ClientSettings, FedGMIClient
from securegmi.engine.dp_client import ClientPrivacy, DpFedGMIClient
from securegmi.engine.evaluation import Evaluation, evaluate
from securegmi.engine.rundir import CONFIG, LEDGERS, PLAN, PROTOCOL, RESULTS, TRANSCRIPT, RunDirectory
from securegmi.engine.secure_client import SecureDpFedGMIClient
from securegmi.engine.secure_server import SecureAggregationServer
from securegmi.engine.seeding import derive_seed, seed_torch
from securegmi.engine.server import AggregationServer
from securegmi.engine.transport import ClientEndpoint, InProcessTransport, ServerEndpoint
from securegmi.errors import RunAbortedError
from securegmi.privacy.calibration import DpPlan, calibrate
from securegmi.privacy.dpsgd import DpSgdConfig
from securegmi.privacy.ledger import PrivacyBudget
from securegmi.protocol import ProtocolSpec, TranscriptWriter
from securegmi.protocol.fields import field_array

ProtocolBuilder = Callable[..., ProtocolSpec]


@dataclass(frozen=True)
class RoundMetrics:
    round: int
    temperature: float
    source_accuracy: float
    pi_tv_error: float
    uplink_bytes: int  # all clients, this round
    refused: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


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
            "rounds": c.rounds,
            "seed": c.seed,
            "source_accuracy": self.evaluation.source_accuracy,
            "pi_tv_error": self.evaluation.pi_tv_error,
            "nll": self.evaluation.nll,
            "uplink_bytes_per_client_round": self.uplink_bytes_per_client_round,
            "wall_seconds": self.wall_seconds,
            "epsilon": self.privacy,  # None: no differential privacy
            "per_client": list(self.evaluation.per_client),
        }


ProgressCallback = Callable[[RoundMetrics], None]
PlanCallback = Callable[[dict[str, Any]], None]  # receives the DP plan before the first round

_IWAE_SAMPLES = 64
# Grid of exported decrypted parameters: far above CKKS error (about 1e-9 at the shipped
# parameters, bench/he_cost.py) and far below what matters for a model.
RELEASE_PRECISION = 1e-6
_NO_MESSAGES = ProtocolSpec("none", "local training: nothing is sent", ())


def _settings(config: SimulationConfig) -> ClientSettings:
    return ClientSettings(
        local_epochs=config.local_epochs,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        elbo_samples=config.elbo_samples,
        e_step_iterations=config.e_step_iterations,
        pi_floor=config.pi_floor,
        weighting="size" if config.method == "fedem-weights" else "mass",
        top_b=config.top_b,
    )


def _new_model(config: SimulationConfig, data: FederatedData) -> MixtureOfVAEs:
    # Every party builds the same public initialisation from the run seed.
    return MixtureOfVAEs(
        config.model_components,
        data.data_dim,
        config.hidden,
        config.latent,
        "bernoulli" if data.likelihood == "bernoulli" else "gaussian",
        seed=config.seed,
    )


def load_federated_data(config: SimulationConfig) -> FederatedData:
    return make_federated_data(
        load_dataset(config.dataset),
        clients=config.clients,
        sources=config.n_sources,
        alpha=config.alpha,
        seed=config.seed,
        source_kind="transforms" if config.sources == "transforms" else "class-groups",
        test_fraction=config.test_fraction,
        samples_per_client=config.samples_per_client,
    )


class _Loop:
    """Shared bookkeeping of one run: evaluation, metrics rows, progress and files."""

    def __init__(
        self,
        config: SimulationConfig,
        data: FederatedData,
        run_dir: RunDirectory | None,
        progress: ProgressCallback | None,
    ) -> None:
        self.config, self.data, self.run_dir, self.progress = config, data, run_dir, progress
        self.history: list[RoundMetrics] = []

    def temperature(self, t: int) -> float:
        c = self.config
        return temperature_at(t, c.rounds, c.initial_temperature, c.anneal_fraction)

    def evaluate(self, models: list[MixtureOfVAEs], pis: list[np.ndarray], final: bool = False) -> Evaluation:
        return evaluate(
            models,
            pis,
            self.data,
            per_client_matching=self.config.method == "local",
            elbo_samples=self.config.elbo_samples,
            iwae_samples=_IWAE_SAMPLES if final else None,
        )

    def finish_round(
        self,
        t: int,
        started: float,
        models: list[MixtureOfVAEs],
        pis: list[np.ndarray],
        uplink: int = 0,
        refused: int = 0,
    ) -> None:
        ev = self.evaluate(models, pis)
        row = RoundMetrics(
            t,
            self.temperature(t),
            ev.source_accuracy,
            ev.pi_tv_error,
            uplink,
            refused,
            time.perf_counter() - started,
        )
        self.history.append(row)
        if self.run_dir is not None:
            self.run_dir.append_metrics(row.to_dict())
        if self.progress is not None:
            self.progress(row)


def run_simulation(
    config: SimulationConfig,
    *,
    protocol: ProtocolBuilder | None = None,
    out: Path | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    on_plan: PlanCallback | None = None,
) -> RunResult:
    """Run one simulated study and, with `out`, write its run directory.

    Federated methods need a `protocol` builder (the composition root picks it, e.g.
    ``securegmi.protocols.plain.build``); `local` and `oracle` exchange no messages.
    """
    started = time.perf_counter()
    run_dir = RunDirectory(out, overwrite=overwrite) if out is not None else None
    data = load_federated_data(config)
    if run_dir is not None:
        run_dir.write_json(CONFIG, config.to_dict())
    loop = _Loop(config, data, run_dir, progress)
    spec: ProtocolSpec | None = None
    privacy: dict[str, Any] | None = None
    if config.method in ("fedgmi", "fedem-weights", "fedavg"):
        if protocol is None:
            raise ValueError(f"method {config.method} needs a protocol builder")
        models, pis, uplink, spec, privacy = _run_federated(loop, protocol, on_plan)
    elif config.method == "local":
        models, pis, uplink = *_run_local(loop), 0.0
    else:
        models, pis, uplink = *_run_oracle(loop), 0.0
    final = loop.evaluate(models, pis, final=True)
    result = RunResult(
        config,
        spec.name if spec else None,
        final,
        tuple(loop.history),
        uplink,
        time.perf_counter() - started,
        data.source_names,
        privacy,
    )
    if run_dir is not None:
        if config.method != "local":
            components = models[0].get_component_vectors()
            if config.protocol == "secure":
                # Decrypted values leave through the one release path (Li-Micciancio).
                components = release_decrypted(components, RELEASE_PRECISION).astype(np.float32)
            run_dir.save_checkpoint(
                components, np.stack(pis), {"method": config.method, "seed": str(config.seed)}
            )
        run_dir.write_json(RESULTS, result.to_dict())
    return result


def _run_federated(
    loop: _Loop, builder: ProtocolBuilder, on_plan: PlanCallback | None
) -> tuple[list[MixtureOfVAEs], list[np.ndarray], float, ProtocolSpec, dict[str, Any] | None]:
    config, data = loop.config, loop.data
    settings = _settings(config)
    reference = _new_model(config, data)
    spec = builder(
        components=reference.n_components, parameters=reference.parameter_count(), top_b=config.top_b
    )
    if loop.run_dir is not None:
        loop.run_dir.write_json(PROTOCOL, {"name": spec.name, "dims": dict(spec.dims)})
    plan = _dp_plan(config) if config.epsilon is not None else None
    secure = config.protocol == "secure"
    if plan is not None:
        if loop.run_dir is not None:
            loop.run_dir.write_json(PLAN, plan.to_dict())
            loop.run_dir.file(LEDGERS).mkdir(exist_ok=True)
        if on_plan is not None:
            on_plan(plan.to_dict())
    # The key ceremony, in-process for a simulation: clients share the secret context, the
    # server gets the public one only.
    keys = SecretContext.generate(CkksParameters(max_clients=max(2, config.clients))) if secure else None
    clients: dict[str, FedGMIClient] = {}
    for i, c in enumerate(data.clients):
        cid = f"client-{i}"
        model = _new_model(config, data)
        if plan is None:
            clients[cid] = FedGMIClient(cid, c.x_train, model, settings, spec, config.seed)
            continue
        ledger = loop.run_dir.file(LEDGERS) / f"{cid}.json" if loop.run_dir is not None else None
        noise_seed = derive_seed(config.seed, 0x5EED, i) if config.dp_noise == "seeded" else None
        privacy = ClientPrivacy(plan, config.dp_batch_normaliser, ledger, noise_seed)
        if keys is None:
            clients[cid] = DpFedGMIClient(cid, c.x_train, model, settings, spec, config.seed, privacy)
        else:
            clients[cid] = SecureDpFedGMIClient(
                cid, c.x_train, model, settings, spec, config.seed, privacy, keys
            )
    k, p = reference.n_components, reference.parameter_count()
    server: AggregationServer | SecureAggregationServer = (
        AggregationServer(reference.get_component_vectors(), spec)
        if keys is None
        else SecureAggregationServer(keys.public(), spec, k, p)
    )
    transcript = TranscriptWriter(loop.run_dir.file(TRANSCRIPT)) if loop.run_dir is not None else None
    transport = InProcessTransport(
        ServerEndpoint(spec, transcript),
        {cid: ClientEndpoint(cid, client.handle, spec) for cid, client in clients.items()},
    )
    uplink_total = 0
    try:
        for t in range(config.rounds):
            t0 = time.perf_counter()
            broadcast = server.broadcast(t, loop.temperature(t))
            exchange = transport.exchange({cid: broadcast for cid in clients})
            if not exchange.replies:
                raise RunAbortedError(
                    f"round {t}: every client refused ({next(iter(exchange.refused.values()))})"
                )
            rejected = server.aggregate(exchange.replies) or {}
            uplink = sum(field_array(f).nbytes for m in exchange.replies.values() for f in m.payload.values())
            uplink_total += uplink
            # Evaluate what a client would hold after decrypting and dividing this aggregate
            # (the harness plays a client here; the server never decrypts).
            sums, masses = _aggregate_in_clear(server, keys, k, p)
            reference.set_component_vectors(_divide(sums, masses, reference))
            loop.finish_round(
                t,
                t0,
                [reference] * len(clients),
                [c.pi for c in clients.values()],
                uplink,
                len(exchange.refused) + len(rejected),
            )
    finally:
        if transcript is not None:
            transcript.close()
    per_client_round = uplink_total / max(1, config.rounds * len(clients))
    summary = None
    if plan is not None:
        ledgers = [c.ledger for c in clients.values() if isinstance(c, DpFedGMIClient)]
        summary = {
            "target": plan.epsilon,
            "delta": plan.delta,
            "max_spent": max(ledger.spent for ledger in ledgers),
            "max_spent_pld": max(ledger.spent_pld() for ledger in ledgers),
            "sgd_noise_multiplier": plan.sgd_noise_multiplier,
            "count_noise_multiplier": plan.count_noise_multiplier,
            "secure_rng": False,
            "noise": config.dp_noise,
        }
    return [reference] * len(clients), [c.pi for c in clients.values()], per_client_round, spec, summary


def _aggregate_in_clear(
    server: AggregationServer | SecureAggregationServer, keys: SecretContext | None, k: int, p: int
) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(server, AggregationServer):
        return server.sums, server.masses
    assert keys is not None and server.sums is not None and server.masses is not None
    return decrypt(keys, server.sums).reshape(k, p), decrypt(keys, server.masses)


def _dp_plan(config: SimulationConfig) -> DpPlan:
    assert config.epsilon is not None
    q = config.sample_rate
    steps_per_epoch = DpSgdConfig(0.0, config.clip_norm, q, config.dp_batch_normaliser).steps_per_epoch
    return calibrate(
        PrivacyBudget(config.epsilon, config.delta),
        rounds=config.rounds,
        steps_per_round=config.local_epochs * steps_per_epoch,
        sample_rate=q,
        clip_norm=config.clip_norm,
        count_share=config.count_share,
    )


def _divide(sums: np.ndarray, masses: np.ndarray, current: MixtureOfVAEs) -> np.ndarray:
    out = current.get_component_vectors()
    present = masses > 0
    out[present] = sums[present] / masses[present, None]
    return out.astype(np.float32)


def _run_local(loop: _Loop) -> tuple[list[MixtureOfVAEs], list[np.ndarray]]:
    config, data = loop.config, loop.data
    settings = _settings(config)
    clients = [
        FedGMIClient(f"client-{i}", c.x_train, _new_model(config, data), settings, _NO_MESSAGES, config.seed)
        for i, c in enumerate(data.clients)
    ]
    for t in range(config.rounds):
        t0 = time.perf_counter()
        for client in clients:
            client.local_round(t, loop.temperature(t))
        loop.finish_round(t, t0, [c.model for c in clients], [c.pi for c in clients])
    return [c.model for c in clients], [c.pi for c in clients]


def _run_oracle(loop: _Loop) -> tuple[list[MixtureOfVAEs], list[np.ndarray]]:
    """Centralised EM on the pooled training data, each client's pi still its own prior: the
    upper reference that federation and privacy can at best match."""
    config, data = loop.config, loop.data
    model = _new_model(config, data)
    k = model.n_components
    pis = [np.full(k, 1.0 / k) for _ in data.clients]
    pooled = np.concatenate([c.x_train for c in data.clients])
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    for t in range(config.rounds):
        t0 = time.perf_counter()
        rng = seed_torch(config.seed, t)
        resps = []
        for i, client in enumerate(data.clients):
            elbo = e_step_elbo(model, client.x_train, config.elbo_samples)
            r, _, pis[i] = infer_mixture(
                elbo, pis[i], loop.temperature(t), config.e_step_iterations, config.pi_floor
            )
            resps.append(r)
        train_components(
            model,
            pooled,
            torch.cat(resps),
            optimiser,
            epochs=config.local_epochs,
            batch_size=config.batch_size,
            generator=rng,
        )
        loop.finish_round(t, t0, [model] * len(pis), pis)
    return [model] * len(pis), pis
