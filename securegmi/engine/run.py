"""The simulation run loop: every method side by side on the same generated clients."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from securegmi.config import SimulationConfig
from securegmi.crypto.release import release_decrypted
from securegmi.engine.baselines import run_central_dp, run_local, run_oracle
from securegmi.engine.evaluation import Evaluation
from securegmi.engine.federated import ProtocolBuilder, run_federated
from securegmi.engine.loop import Loop, PlanCallback, ProgressCallback, RoundMetrics, load_federated_data
from securegmi.engine.rundir import CONFIG, RESULTS, RunDirectory
from securegmi.protocol import ProtocolSpec

# Grid of exported decrypted parameters: far above CKKS error (about 1e-9 at the shipped
# parameters, bench/he_cost.py) and far below what matters for a model.
RELEASE_PRECISION = 1e-6

__all__ = ["RELEASE_PRECISION", "RoundMetrics", "RunResult", "run_simulation"]


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
        }


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
    loop = Loop(config, data, run_dir, progress)
    spec: ProtocolSpec | None = None
    privacy: dict[str, Any] | None = None
    if config.method in ("fedgmi", "fedem-weights", "fedavg"):
        if protocol is None:
            raise ValueError(f"method {config.method} needs a protocol builder")
        models, pis, uplink, spec, privacy = run_federated(loop, protocol, on_plan)
    elif config.method == "central-dp":
        models, pis, privacy = run_central_dp(loop)
        uplink = 0.0
    elif config.method == "local":
        models, pis, uplink = *run_local(loop), 0.0
    else:
        models, pis, uplink = *run_oracle(loop), 0.0
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
        if config.method not in ("local", "central-dp"):
            components = models[0].get_component_vectors()
            if config.protocol == "secure":
                # Decrypted values leave through the one release path (Li-Micciancio).
                components = release_decrypted(components, RELEASE_PRECISION).astype(np.float32)
            # The source identifier of the statistics design (fine clusters and their grouping).
            extra = {} if loop.identifier is None else loop.identifier.arrays()
            if config.protocol == "secure":
                extra = {k: release_decrypted(v, RELEASE_PRECISION) for k, v in extra.items()}
            run_dir.save_checkpoint(
                components, np.stack(pis), {"method": config.method, "seed": str(config.seed)}, extra
            )
        run_dir.write_json(RESULTS, result.to_dict())
    return result
