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
from securegmi.crypto.signing import SignerRegistry, SigningKey
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
    calibrate_statistics,
    check_delta,
)
from securegmi.privacy.ledger import PrivacyBudget
from securegmi.protocol import ProtocolSpec, registry
from securegmi.records.rundir import RunDirectory
from securegmi.vocabulary import PrivateDesign


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
    def build(cls, config: SimulationConfig, data: FederatedData | None = None) -> Federation:
        """The study `config` describes, under the protocol it names (found in the registry)."""
        data = data if data is not None else load_federated_data(config)
        plan = dp_plan(config, data) if config.epsilon is not None else None
        spec = bind_protocol(
            config.protocol, new_model(config, data), plan=plan, clients=len(data.clients), top_b=config.top_b
        )
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
        signing_key: SigningKey | None = None,
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
            signing_key=signing_key,
        )

    def server(
        self,
        public: PublicContext | None,
        transcript_path: Path | None = None,
        signers: SignerRegistry | None = None,
    ) -> Server:
        # The protocol declares the minimum cohort of every private aggregate (its N).
        return Server(self.spec, public, transcript_path=transcript_path, signers=signers)

    def exported(self, values: np.ndarray) -> np.ndarray:
        """Values a run exports (components, the source identifier). Under CKKS they are
        post-processing of aggregates that passed the release function on decryption; rounding
        them to the same grid keeps every exported value on it, as an auditor can check."""
        if not self.secure:
            return values
        return release_decrypted(values, self.ckks_parameters().release_grid()).astype(values.dtype)

    def write_public_files(self, run_dir: RunDirectory) -> None:
        """The protocol and DP plan beside the transcript, for the audit."""
        run_dir.write_public_files(self.spec, self.plan)


def bind_protocol(
    name: str,
    components: MixtureOfVAEs,
    *,
    plan: DpPlan | PrivateMixturePlan | None = None,
    clients: int | None = None,
    top_b: int | None = None,
) -> ProtocolSpec:
    """The registered protocol `name` (one of `securegmi.PROTOCOLS`) bound to the sizes of
    `components` and, under the statistics design's `plan` (`calibrate_statistics`, the default
    private design), to the sizes of its statistics phase (the histogram matrix has a row per
    client of the cohort, hence `clients`); the bound protocol declares the plan's minimum
    cohort, which `Server(spec)` then enforces. Every engine, the front door and the CLI bind
    here, so that all of them run the protocol the run records."""
    statistics = None
    if isinstance(plan, PrivateMixturePlan):
        if clients is None:
            raise ConfigError("a statistics-design plan needs clients= (the cohort size)")
        if not plan.statistics.min_clients <= clients:
            raise ConfigError(
                f"the plan's minimum cohort is {plan.statistics.min_clients}, above the {clients} clients"
            )
        size = components.n_components * components.parameter_count()
        statistics = statistics_dims(plan, clients, size, components.n_components)
    return registry.bind(
        name,
        components=components.n_components,
        parameters=components.parameter_count(),
        top_b=top_b,
        statistics=statistics,
    )


def dp_plan(config: SimulationConfig, data: FederatedData) -> DpPlan | PrivateMixturePlan:
    """The plan from epsilon, delta and public sizes only (never from the private data:
    Papernot & Steinke, ICLR 2022)."""
    if config.epsilon is None:
        raise ConfigError("a DP plan needs the run's budget: set epsilon (--epsilon)")
    check_delta(config.delta, max(len(c.x_train) for c in data.clients))
    if config.private_training == PrivateDesign.STATISTICS:
        return calibrate_statistics(
            PrivacyBudget(config.epsilon, config.delta),
            clients=config.clients,
            features=data.data_dim,
            likelihood=data.likelihood,
            vae_rounds=config.vae_rounds,
            local_epochs=config.local_epochs,
            sample_rate=config.sample_rate,
            clip_norm=config.clip_norm,
            placement=config.placement,
            sgd_placement=config.dp_sgd_placement,
            min_clients=config.cohort_minimum,
            fine_clusters=config.statistics_sizes.fine_clusters,
            projection_dim=config.statistics_sizes.projection_dim,
            kmeans_iterations=config.statistics_sizes.kmeans_iterations,
            statistics_share=config.statistics_share,
            identifier_steps=config.planned_identifier_steps,
            identifier_share=config.identifier_share,
            seed=config.seed,
        )
    return calibrate(
        PrivacyBudget(config.epsilon, config.delta),
        rounds=config.rounds,
        steps_per_round=config.sgd_steps,
        sample_rate=config.sample_rate,
        clip_norm=config.clip_norm,
        count_share=config.count_share,
    )
