"""The federated methods: clients and a server exchanging protocol messages through a transport,
with DP ledgers and CKKS keys when the protocol asks for them."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from securegmi.config import SimulationConfig
from securegmi.core.mixture import MixtureOfVAEs, divide_aggregate
from securegmi.crypto.envelope import decrypt
from securegmi.crypto.keys import PublicContext, SecretContext
from securegmi.crypto.params import CkksParameters
from securegmi.data.mixture import FederatedData
from securegmi.engine.dp_client import ClientPrivacy
from securegmi.engine.loop import Loop, PlanCallback, client_settings, load_federated_data, new_model
from securegmi.engine.participant import Client
from securegmi.engine.rundir import LEDGERS, PLAN, PROTOCOL, TRANSCRIPT, RunDirectory
from securegmi.engine.secure_server import SecureAggregationServer
from securegmi.engine.seeding import derive_seed
from securegmi.engine.server import AggregationServer
from securegmi.engine.statistics import statistics_dims
from securegmi.engine.transport import InProcessTransport, ServerEndpoint, Transport
from securegmi.errors import ConfigError, RunAbortedError
from securegmi.privacy.calibration import (
    DpPlan,
    PrivateMixturePlan,
    StatisticsPlan,
    calibrate,
    calibrate_private_mixture,
)
from securegmi.privacy.dpsgd import DpSgdConfig
from securegmi.privacy.ledger import PrivacyBudget, PrivacyLedger
from securegmi.protocol import Message, ProtocolSpec, TranscriptWriter
from securegmi.protocol.fields import field_array

ProtocolBuilder = Callable[..., ProtocolSpec]


@dataclass(frozen=True)
class Federation:
    """What every party of a simulated study derives from the public config before round 0:
    the clients' data split, the protocol, and the DP plan. Engines (in-process, Flower) build
    their clients and server from it, so they run the same study."""

    config: SimulationConfig
    data: FederatedData
    spec: ProtocolSpec
    plan: DpPlan | PrivateMixturePlan | None

    @classmethod
    def build(
        cls, config: SimulationConfig, builder: ProtocolBuilder, data: FederatedData | None = None
    ) -> Federation:
        data = data if data is not None else load_federated_data(config)
        reference = new_model(config, data)
        plan = dp_plan(config, data) if config.epsilon is not None else None
        dims = None
        if isinstance(plan, PrivateMixturePlan):
            dims = statistics_dims(plan.statistics, len(data.clients))
        spec = builder(
            components=reference.n_components,
            parameters=reference.parameter_count(),
            top_b=config.top_b,
            **({} if dims is None else {"statistics": dims}),
        )
        return cls(config, data, spec, plan)

    @property
    def rounds(self) -> int:
        """Every round the run plays, the statistics phase's included."""
        return self.plan.rounds if isinstance(self.plan, PrivateMixturePlan) else self.config.rounds

    @property
    def statistics(self) -> StatisticsPlan | None:
        return self.plan.statistics if isinstance(self.plan, PrivateMixturePlan) else None

    @property
    def client_ids(self) -> list[str]:
        return [f"client-{i}" for i in range(len(self.data.clients))]

    @property
    def secure(self) -> bool:
        return self.config.protocol == "secure"

    def ckks_parameters(self) -> CkksParameters:
        return CkksParameters(max_clients=max(2, self.config.clients))

    def client(
        self,
        index: int,
        keys: SecretContext | None,
        ledger_dir: Path | None = None,
        state_path: Path | None = None,
        transcript_path: Path | None = None,
    ) -> Client:
        """Client `index` (data split, model, privacy and keys), as any engine builds it."""
        config, cid = self.config, f"client-{index}"
        privacy = None
        if self.plan is not None:
            ledger = ledger_dir / f"{cid}.json" if ledger_dir is not None else None
            noise_seed = derive_seed(config.seed, 0x5EED, index) if config.dp_noise == "seeded" else None
            privacy = ClientPrivacy(
                self.plan,
                config.dp_batch_normaliser,
                ledger,
                noise_seed,
                slot=index,
                cohort=len(self.data.clients),
            )
        return Client(
            cid,
            new_model(config, self.data),
            self.data.clients[index].x_train,
            self.spec,
            settings=client_settings(config),
            privacy=privacy,
            keys=keys,
            seed=config.seed,
            state_path=state_path,
            transcript_path=transcript_path,
        )

    def server(self, public: PublicContext | None) -> AggregationServer | SecureAggregationServer:
        reference = new_model(self.config, self.data)
        if public is None:
            return AggregationServer(reference.get_component_vectors(), self.spec, self.statistics)
        return SecureAggregationServer(
            public, self.spec, reference.n_components, reference.parameter_count(), self.statistics
        )

    def write_public_files(self, run_dir: RunDirectory) -> None:
        """The protocol and DP plan beside the transcript, for the audit."""
        run_dir.write_json(PROTOCOL, {"name": self.spec.name, "dims": dict(self.spec.dims)})
        if self.plan is not None:
            run_dir.write_json(PLAN, self.plan.to_dict())
            run_dir.file(LEDGERS).mkdir(exist_ok=True)


@dataclass(frozen=True)
class RoundOutcome:
    replies: dict[str, Message]
    refused: dict[str, str]  # by the client's own checks or ledger, or on receipt
    rejected: dict[str, str]  # by the server's ciphertext checks
    uplink_bytes: int


def play_round(
    server: AggregationServer | SecureAggregationServer,
    transport: Transport,
    client_ids: list[str],
    round_index: int,
    temperature: float,
) -> RoundOutcome:
    """One round: broadcast, collect the validated replies, add them. Whatever the transport."""
    broadcast = server.broadcast(round_index, temperature)
    exchange = transport.exchange({cid: broadcast for cid in client_ids})
    if not exchange.replies:
        raise RunAbortedError(
            f"round {round_index}: every client refused ({next(iter(exchange.refused.values()))})"
        )
    rejected = server.aggregate(exchange.replies)
    uplink = sum(field_array(f).nbytes for m in exchange.replies.values() for f in m.payload.values())
    return RoundOutcome(exchange.replies, exchange.refused, rejected, uplink)


def run_federated(
    loop: Loop, builder: ProtocolBuilder, on_plan: PlanCallback | None
) -> tuple[list[MixtureOfVAEs], list[np.ndarray], float, ProtocolSpec, dict[str, Any] | None]:
    config = loop.config
    federation = Federation.build(config, builder, loop.data)
    spec, plan = federation.spec, federation.plan
    ledger_dir = loop.run_dir.file(LEDGERS) if loop.run_dir is not None and plan is not None else None
    if loop.run_dir is not None:
        federation.write_public_files(loop.run_dir)
    if plan is not None and on_plan is not None:
        on_plan(plan.to_dict())
    # The key ceremony, in-process for a simulation: clients share the secret context, the
    # server gets the public one only.
    keys = SecretContext.generate(federation.ckks_parameters()) if federation.secure else None
    clients = {cid: federation.client(i, keys, ledger_dir) for i, cid in enumerate(federation.client_ids)}
    server = federation.server(keys.public() if keys is not None else None)
    reference = new_model(config, loop.data)
    k, p = reference.n_components, reference.parameter_count()
    transcript = TranscriptWriter(loop.run_dir.file(TRANSCRIPT)) if loop.run_dir is not None else None
    transport = InProcessTransport(
        ServerEndpoint(spec, transcript), {cid: client.endpoint for cid, client in clients.items()}
    )
    uplink_total = 0
    stats_rounds = federation.statistics.rounds if federation.statistics is not None else 0
    harness = next(iter(clients.values()))  # the harness plays a client to evaluate
    try:
        for t in range(federation.rounds):
            t0 = time.perf_counter()
            outcome = play_round(server, transport, list(clients), t, loop.temperature(t))
            uplink_total += outcome.uplink_bytes
            if t < stats_rounds:
                continue  # no model yet: the statistics phase ends with the first VAE round
            loop.identifier = harness.identifier
            # Evaluate what a client would hold after decrypting and dividing this aggregate
            # (the harness plays a client here; the server never decrypts).
            sums, masses = _aggregate_in_clear(server, keys, k, p)
            reference.set_component_vectors(divide_aggregate(sums, masses, reference.get_component_vectors()))
            loop.finish_round(
                t,
                t0,
                [reference] * len(clients),
                [c.pi for c in clients.values()],
                outcome.uplink_bytes,
                len(outcome.refused) + len(outcome.rejected),
            )
    finally:
        if transcript is not None:
            transcript.close()
    per_client_round = uplink_total / max(1, federation.rounds * len(clients))
    summary = None
    if plan is not None:
        ledgers = [c.ledger for c in clients.values() if c.ledger is not None]
        summary = privacy_summary(config, plan, ledgers)
    return [reference] * len(clients), [c.pi for c in clients.values()], per_client_round, spec, summary


def privacy_summary(
    config: SimulationConfig, plan: DpPlan | PrivateMixturePlan, ledgers: list[PrivacyLedger]
) -> dict[str, Any]:
    summary = {
        "target": plan.epsilon,
        "delta": plan.delta,
        "max_spent": max(ledger.spent for ledger in ledgers),
        "max_spent_pld": max(ledger.spent_pld() for ledger in ledgers),
        # Against the server colluding with one client (split noise); equal to max_spent otherwise.
        "max_spent_fallback": max(ledger.spent_fallback for ledger in ledgers),
        "placement": config.placement,
        "design": config.private_training,
        "sgd_noise_multiplier": plan.sgd_noise_multiplier,
        "secure_rng": False,
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
        }
    return summary


def _aggregate_in_clear(
    server: AggregationServer | SecureAggregationServer, keys: SecretContext | None, k: int, p: int
) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(server, AggregationServer):
        return server.sums, server.masses
    assert keys is not None and server.sums is not None and server.masses is not None
    return decrypt(keys, server.sums).reshape(k, p), decrypt(keys, server.masses)


SKETCH_DIM = 64  # see core.fine_clusters.public_sketch


def dp_plan(config: SimulationConfig, data: FederatedData) -> DpPlan | PrivateMixturePlan:
    """The plan from epsilon, delta and public sizes only (never from the private data:
    Papernot & Steinke, ICLR 2022)."""
    assert config.epsilon is not None
    largest = max(len(c.x_train) for c in data.clients)
    if config.delta >= 0.1 / largest:
        # delta bounds the probability of an outright failure of the guarantee: at delta near
        # 1/n a mechanism may publish one of a client's n records (Dwork & Roth 2014, §2.3).
        raise ConfigError(
            f"delta {config.delta:g} is not well below 1/n for the largest client (n = {largest}): "
            f"it would allow releasing a record outright. Use --delta below {0.1 / largest:.2g}, "
            "e.g. 1e-5."
        )
    q = config.sample_rate
    steps_per_epoch = DpSgdConfig(0.0, config.clip_norm, q, config.dp_batch_normaliser).steps_per_epoch
    if config.private_training == "statistics":
        return calibrate_private_mixture(
            PrivacyBudget(config.epsilon, config.delta),
            statistics=StatisticsPlan(
                clusters=config.fine_clusters,
                projection_dim=min(config.projection_dim, data.data_dim, SKETCH_DIM),
                iterations=config.kmeans_iterations,
                # A public centre for the unit-sphere map: mid-range of [0, 1] intensities,
                # the origin for standardised (Gaussian-likelihood) data.
                centre=0.5 if data.likelihood == "bernoulli" else 0.0,
                sketch_dim=min(data.data_dim, SKETCH_DIM),
                sketch_seed=config.seed,
                placement=config.placement,
                min_clients=config.cohort_minimum,
                moments_noise=0.0,
                cluster_noise=0.0,
                histogram_noise=0.0,
            ),
            vae_rounds=config.vae_rounds,
            steps_per_round=config.local_epochs * steps_per_epoch,
            sample_rate=q,
            clip_norm=config.clip_norm,
            statistics_share=config.statistics_share,
        )
    return calibrate(
        PrivacyBudget(config.epsilon, config.delta),
        rounds=config.rounds,
        steps_per_round=config.local_epochs * steps_per_epoch,
        sample_rate=q,
        clip_norm=config.clip_norm,
        count_share=config.count_share,
    )
