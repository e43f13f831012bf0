"""A simulated run's bookkeeping: evaluation against the ground truth the harness keeps, the
metrics row of every round, progress callbacks, and the run directory's metrics file."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from securegmi.config import SimulationConfig
from securegmi.core.em import temperature_at
from securegmi.core.fine_clusters import FineClusterModel
from securegmi.core.mixture import IWAE_SAMPLES, SCORE_SAMPLES, MixtureOfVAEs
from securegmi.data.mixture import FederatedData
from securegmi.errors import RunDirectoryError
from securegmi.records.rundir import RunDirectory
from securegmi.simulation.evaluation import Evaluation, Scorer, evaluate


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


# What results.json and metrics.jsonl hold that no party of the protocol ever released: the
# harness scores every client's test records against their true sources and true pi, which it
# alone holds. No DP guarantee covers these figures, and a deployment has none of them. Each
# record names such fields under this key.
EVALUATION_ONLY = "evaluation_only"
EVALUATION_ONLY_NOTE = (
    "computed by the simulation harness from every client's test records and their true sources "
    "and mixture proportions, which only the harness holds; no client released these values, no "
    "DP guarantee covers them, and a deployment has none of them"
)


def evaluation_only(*names: str) -> dict[str, Any]:
    """The marker a results or metrics record carries: which of its fields are ground truth."""
    return {"fields": list(names), "note": EVALUATION_ONLY_NOTE}


METRICS_MARKER = evaluation_only("source_accuracy", "pi_tv_error")

ProgressCallback = Callable[[RoundMetrics], None]
PlanCallback = Callable[[dict[str, Any]], None]  # receives the DP plan before the first round


class Recorder:
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
        # A method whose components are not VAEs (fedgmm) scores records itself, and has no
        # IWAE bound to report as its NLL.
        self.scorer: Scorer | None = None

    def resume(self, next_round: int) -> None:
        """Take up the metrics of the rounds a stopped run completed."""
        if self.run_dir is None:
            raise RunDirectoryError("only a run with a run directory can be resumed: pass --out")
        try:
            self.history = [
                RoundMetrics(**{k: v for k, v in row.items() if k != EVALUATION_ONLY})
                for row in self.run_dir.keep_metrics_before(next_round)
            ]
        except TypeError as exc:
            raise RunDirectoryError(
                f"{self.run_dir.path}: a metrics row is not one securegmi wrote ({exc})"
            ) from exc

    def temperature(self, t: int) -> float:
        c = self.config
        return temperature_at(t, c.rounds, c.initial_temperature, c.anneal_fraction)

    def evaluate(self, models: list[MixtureOfVAEs], pis: list[np.ndarray], final: bool = False) -> Evaluation:
        return evaluate(
            models,
            pis,
            self.data,
            per_client_matching=self.config.method == "local",
            elbo_samples=SCORE_SAMPLES if final else self.config.elbo_samples,
            iwae_samples=IWAE_SAMPLES if final and self.scorer is None else None,
            scorer=self.identifier.log_likelihood if self.identifier is not None else self.scorer,
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
            self.run_dir.append_metrics(row.to_dict() | {EVALUATION_ONLY: METRICS_MARKER})
        if self.progress is not None:
            self.progress(row)
