"""The front door's composition: the protocols by name (`bind_protocol`, for your own
components and plan), and `simulate` with the protocol the configuration names. Like the CLI,
and unlike the rest of the library, it may import `securegmi.protocols` (the declarations sit
above the library that enforces them)."""

from __future__ import annotations

from pathlib import Path

from securegmi import protocols
from securegmi.config import SimulationConfig
from securegmi.core.mixture import MixtureOfVAEs
from securegmi.errors import ConfigError
from securegmi.federation.statistics import statistics_dims
from securegmi.privacy.calibration import DpPlan, PrivateMixturePlan
from securegmi.protocol import ProtocolBuilder, ProtocolSpec
from securegmi.records.audit import AuditReport, audit_run
from securegmi.simulation.recorder import PlanCallback, ProgressCallback
from securegmi.simulation.runner import FEDERATED, RunResult, run_simulation

PROTOCOLS = tuple(sorted(protocols.PROTOCOLS))


def _protocol_builder(name: str) -> ProtocolBuilder:
    """The one place the front door looks a protocol up by name."""
    return protocols.builder(name)


def bind_protocol(
    name: str,
    components: MixtureOfVAEs,
    *,
    plan: DpPlan | PrivateMixturePlan | None = None,
    clients: int | None = None,
    top_b: int | None = None,
) -> ProtocolSpec:
    """The named protocol (one of `PROTOCOLS`) bound to your components' sizes and, for a
    private run, to its plan. A plan of the statistics design (`calibrate_statistics`, the
    default private design) also needs the cohort size `clients` (the histogram matrix has a
    row each); the bound protocol declares the plan's minimum cohort, which `Server(spec)`
    then enforces."""
    extra = {}
    if isinstance(plan, PrivateMixturePlan):
        if clients is None:
            raise ConfigError("a statistics-design plan needs clients= (the cohort size)")
        if not plan.statistics.min_clients <= clients:
            raise ConfigError(
                f"the plan's minimum cohort is {plan.statistics.min_clients}, above the {clients} clients"
            )
        size = components.n_components * components.parameter_count()
        extra["statistics"] = statistics_dims(plan, clients, size)
    return _protocol_builder(name)(
        components=components.n_components, parameters=components.parameter_count(), top_b=top_b, **extra
    )


def simulate(
    config: SimulationConfig,
    *,
    out: Path | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    on_plan: PlanCallback | None = None,
) -> RunResult:
    """Run one simulated study (`securegmi simulate` without the terminal): the method and
    protocol the configuration names; with `out`, a run directory for `audit`, `load` and
    `securegmi report`."""
    builder = protocols.builder(config.protocol) if config.method in FEDERATED else None
    return run_simulation(
        config, protocol=builder, out=out, overwrite=overwrite, progress=progress, on_plan=on_plan
    )


def audit(run_dir: Path) -> AuditReport:
    """Check a run directory: every field that left a client is declared and covered by a
    ledger event, and every ledger stays within its budget."""
    return audit_run(Path(run_dir), protocols.builder)
