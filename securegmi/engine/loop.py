"""Shared machinery of a simulated run: the clients' data and models, and per-round bookkeeping."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from securegmi.config import SimulationConfig
from securegmi.core.em import temperature_at
from securegmi.core.fine_clusters import FineClusterModel
from securegmi.core.mixture import MixtureOfVAEs
from securegmi.data.datasets import load_dataset
from securegmi.data.mixture import FederatedData, make_federated_data
from securegmi.engine.client import ClientSettings
from securegmi.engine.evaluation import Evaluation, evaluate
from securegmi.engine.rundir import RunDirectory

IWAE_SAMPLES = 64


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


ProgressCallback = Callable[[RoundMetrics], None]
PlanCallback = Callable[[dict[str, Any]], None]  # receives the DP plan before the first round


def client_settings(config: SimulationConfig) -> ClientSettings:
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


class Loop:
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
        # Source identification from released statistics, where the run has them; None: the
        # VAEs' ELBOs identify sources.
        self.identifier: FineClusterModel | None = None

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
            iwae_samples=IWAE_SAMPLES if final else None,
            scorer=None if self.identifier is None else self.identifier.log_likelihood,
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
