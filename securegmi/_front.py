"""The front door's composition: the protocols by name (`securegmi.protocol.registry`), and
`simulate` with the protocol the configuration names."""

from __future__ import annotations

from pathlib import Path

from securegmi.config import SimulationConfig
from securegmi.core.mixture import MixtureOfVAEs
from securegmi.privacy.calibration import DpPlan, PrivateMixturePlan
from securegmi.protocol import ProtocolSpec, registry
from securegmi.records.audit import AuditReport, audit_run
from securegmi.simulation.recorder import PlanCallback, ProgressCallback
from securegmi.simulation.runner import RunResult, run_simulation
from securegmi.simulation.study import bind_protocol

PROTOCOLS = registry.available()


def protocol(
    name: str,
    components: MixtureOfVAEs,
    *,
    plan: DpPlan | PrivateMixturePlan | None = None,
    clients: int | None = None,
    top_b: int | None = None,
) -> ProtocolSpec:
    """The named protocol (one of `PROTOCOLS`) bound to your components' sizes; a statistics
    design plan also needs the cohort size `clients` (the histogram matrix has a row each)."""
    return bind_protocol(name, components, plan=plan, clients=clients, top_b=top_b)


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
    return run_simulation(config, out=out, overwrite=overwrite, progress=progress, on_plan=on_plan)


def audit(run_dir: Path, *, ledgers: Path | None = None) -> AuditReport:
    """Check a run directory: every field that left a client is declared and covered by a
    ledger event, and every ledger stays within its budget. `ledgers`: where the clients'
    ledgers are when the run directory does not hold them (a Flower server's directory)."""
    return audit_run(Path(run_dir), ledgers=ledgers)
