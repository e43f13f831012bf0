"""The front door's composition: the protocols by name (`securegmi.protocol.registry`;
`bind_protocol` for your own components and plan), and `simulate` and `audit` with the protocol
the configuration or the run names."""

from __future__ import annotations

from pathlib import Path

from securegmi.config import SimulationConfig
from securegmi.protocol import registry
from securegmi.records.audit import AuditReport, audit_run
from securegmi.simulation.recorder import PlanCallback, ProgressCallback
from securegmi.simulation.runner import RunResult, run_simulation
from securegmi.simulation.study import bind_protocol

__all__ = ["PROTOCOLS", "audit", "bind_protocol", "simulate"]

PROTOCOLS = registry.available()


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


def audit(
    run_dir: Path,
    *,
    ledgers: Path | None = None,
    trust_recorded_protocol: bool = False,
    signers: Path | None = None,
) -> AuditReport:
    """Check a run directory: every field that left a client is declared and covered by a
    ledger event, and every ledger stays within its budget. `ledgers`: where the clients'
    ledgers are when the run directory does not hold them (a Flower server's directory).
    `trust_recorded_protocol`: accept a protocol not registered here on its recorded
    declaration alone (see `securegmi.records.audit.audit_run`). `signers`: the registry of the
    clients' public signing keys the study registered; every client message and ledger entry
    must verify under it (without it, under the run directory's own copy: self-consistency only)."""
    return audit_run(
        Path(run_dir), ledgers=ledgers, trust_recorded_protocol=trust_recorded_protocol, signers=signers
    )
