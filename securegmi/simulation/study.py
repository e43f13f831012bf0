"""A simulated study: what every party derives from the public config before round 0 (the
clients' data split, the protocol, the DP plan), and the clients and server built from it.
Engines (in-process, Flower) build their parties here, so they run the same study."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from securegmi.config import SimulationConfig
from securegmi.core.mixture import MixtureOfVAEs
from securegmi.crypto.keys import PublicContext, SecretContext
from securegmi.crypto.params import CkksParameters
from securegmi.crypto.release import release_decrypted
from securegmi.data.datasets import load_dataset
from securegmi.data.mixture import FederatedData, make_federated_data
from securegmi.errors import ConfigError
from securegmi.federation.client import Client
from securegmi.federation.local import ClientSettings, derive_seed
from securegmi.federation.release import ClientPrivacy
from securegmi.federation.server import Server
from securegmi.federation.statistics import statistics_dims
from securegmi.privacy.calibration import (
    DpPlan,
    PrivateMixturePlan,
    StatisticsPlan,
    calibrate,
    calibrate_private_mixture,
)
from securegmi.privacy.ledger import PrivacyBudget
from securegmi.protocol import ProtocolBuilder, ProtocolSpec
from securegmi.records.rundir import LEDGERS, PLAN, PROTOCOL, RunDirectory

SKETCH_DIM = 64  # see core.fine_clusters.public_sketch


def client_settings(config: SimulationConfig) -> ClientSettings:
    shared = ("local_epochs", "batch_size", "elbo_samples", "e_step_iterations", "pi_floor")
    return ClientSettings(
        **{name: getattr(config, name) for name in shared},
        learning_rate=config.step_size,
        weighting="size" if config.method == "fedem-weights" else "mass",
        top_b=config.top_b,
        assignment="cluster" if config.method == "ifca" else "mixture",
    )


def new_model(config: SimulationConfig, data: FederatedData) -> MixtureOfVAEs:
    # Every party builds the same public initialisation from the run seed.
    return MixtureOfVAEs.mlp(
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


@dataclass(frozen=True)
class Federation:
    """The study's public agreements; `client` and `server` build its parties."""

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
        extra = {}
        if isinstance(plan, PrivateMixturePlan):
            size = reference.n_components * reference.parameter_count()
            extra["statistics"] = statistics_dims(plan, len(data.clients), size)
        spec = builder(
            components=reference.n_components,
            parameters=reference.parameter_count(),
            top_b=config.top_b,
            **extra,
        )
        check_protocol_name(config, spec)
        return cls(config, data, spec, plan)

    @property
    def rounds(self) -> int:
        """Every round the run plays, the statistics phase's included."""
        return self.plan.rounds if self.plan is not None else self.config.rounds

    @property
    def statistics(self) -> StatisticsPlan | None:
        return self.plan.statistics if isinstance(self.plan, PrivateMixturePlan) else None

    @property
    def client_ids(self) -> list[str]:
        return [f"client-{i}" for i in range(len(self.data.clients))]

    @property
    def secure(self) -> bool:
        return self.spec.codec == "ckks"

    def ckks_parameters(self) -> CkksParameters:
        return CkksParameters.for_cohort(max(2, self.config.clients))

    def new_model(self) -> MixtureOfVAEs:
        return new_model(self.config, self.data)

    def client(
        self,
        index: int,
        keys: SecretContext | None,
        ledger_dir: Path | None = None,
        state_path: Path | None = None,
        transcript_path: Path | None = None,
    ) -> Client:
        """Client `index` (data split, model, privacy and keys), as any engine builds it."""
        config, cid = self.config, self.client_ids[index]
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
            self.new_model(),
            self.data.clients[index].x_train,
            self.spec,
            settings=client_settings(config),
            privacy=privacy,
            keys=keys,
            seed=config.seed,
            state_path=state_path,
            transcript_path=transcript_path,
        )

    def server(self, public: PublicContext | None, transcript_path: Path | None = None) -> Server:
        # The protocol declares the minimum cohort of every private aggregate (its N).
        return Server(self.spec, public, transcript_path=transcript_path)

    def exported(self, values: np.ndarray) -> np.ndarray:
        """Values a run exports (components, the source identifier). Under CKKS they are
        post-processing of aggregates that passed the release function on decryption; rounding
        them to the same grid keeps every exported value on it, as an auditor can check."""
        if not self.secure:
            return values
        return release_decrypted(values, self.ckks_parameters().release_grid()).astype(values.dtype)

    def write_public_files(self, run_dir: RunDirectory) -> None:
        """The protocol and DP plan beside the transcript, for the audit."""
        run_dir.write_json(PROTOCOL, {"name": self.spec.name, "dims": dict(self.spec.dims)})
        if self.plan is not None:
            run_dir.write_json(PLAN, self.plan.to_dict())
            run_dir.file(LEDGERS).mkdir(exist_ok=True)


def check_protocol_name(config: SimulationConfig, spec: ProtocolSpec) -> None:
    """config.json, the audit and the plan's placement all read config.protocol: a run under
    another protocol would be audited as the one it is not."""
    if spec.name != config.protocol:
        raise ConfigError(
            f"the configuration names protocol {config.protocol!r}, the builder gives {spec.name!r}"
        )


def dp_plan(config: SimulationConfig, data: FederatedData) -> DpPlan | PrivateMixturePlan:
    """The plan from epsilon, delta and public sizes only (never from the private data:
    Papernot & Steinke, ICLR 2022)."""
    if config.epsilon is None:
        raise ConfigError("a DP plan needs the run's budget: set epsilon (--epsilon)")
    largest = max(len(c.x_train) for c in data.clients)
    if config.delta >= 0.1 / largest:
        # delta bounds the probability of an outright failure of the guarantee: at delta near
        # 1/n a mechanism may publish one of a client's n records (Dwork & Roth 2014, §2.3).
        # The message states the rule, never the client's size nor a figure derived from it:
        # how many records a client holds is its own (private) business.
        raise ConfigError(
            f"delta {config.delta:g} is not well below 1/n for the largest client (n its number of "
            "records, not printed here: a client's size is private): it would allow releasing a "
            "record outright. Use a smaller --delta, below 0.1/n: 1e-5 suits clients of up to "
            "10,000 records, 1e-6 up to 100,000."
        )
    q = config.sample_rate
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
            steps_per_round=config.sgd_steps,
            sgd_placement=config.sgd_placement,
            sample_rate=q,
            clip_norm=config.clip_norm,
            statistics_share=config.statistics_share,
        )
    return calibrate(
        PrivacyBudget(config.epsilon, config.delta),
        rounds=config.rounds,
        steps_per_round=config.sgd_steps,
        sample_rate=q,
        clip_norm=config.clip_norm,
        count_share=config.count_share,
    )
