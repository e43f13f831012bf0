"""The disclosure audit of a run directory: what left each client, under which protection, and
how much privacy it cost, derived from the protocol spec, the transcript and the ledgers."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from securegmi.errors import ConfigError, PrivacyError, RunDirectoryError
from securegmi.files import JSON_FILE, read_json
from securegmi.privacy.calibration import DpPlan, PrivateMixturePlan, plan_from_dict
from securegmi.privacy.ledger import LedgerEntry, PrivacyLedger
from securegmi.protocol import SERVER, FieldKind, ProtocolBuilder, read_transcript
from securegmi.records.rundir import CONFIG, LEDGERS, PLAN, PROTOCOL, TRANSCRIPT


@dataclass(frozen=True)
class ClientBudget:
    client: str
    releases: int
    epsilon_rdp: float
    epsilon_pld: float
    epsilon_fallback: float  # against the server colluding with one client (split noise)
    # Recomputed from the events the server's transcript recorded as the releases arrived
    # (RDP); at most epsilon_rdp, or the ledger understates what was released.
    epsilon_transcript: float
    delta: float
    budget: float
    remaining: float
    exceeded: bool


@dataclass(frozen=True)
class Disclosure:
    client: str
    field: str
    kind: str
    messages: int
    bytes: int
    protection: str  # "dp", "dp+encrypted" (every release on the ledger), "public", "none", ...
    uncovered_events: tuple[str, ...] = ()
    packed_in: str | None = None  # the field whose ciphertexts carried these values (bytes 0)


@dataclass(frozen=True)
class AuditReport:
    run_dir: str
    protocol: str
    budgets: tuple[ClientBudget, ...]
    disclosures: tuple[Disclosure, ...]
    problems: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def audit_run(run_dir: Path, builder_for: Callable[[str], ProtocolBuilder]) -> AuditReport:
    run_dir = Path(run_dir)
    files = [run_dir / name for name in (CONFIG, TRANSCRIPT, PROTOCOL)]
    if not all(f.exists() for f in files):
        raise RunDirectoryError(
            f"{run_dir} lacks {', '.join(f.name for f in files if not f.exists())}: "
            "not the run directory of a federated run"
        )
    try:
        rows = [_transcript_row(row) for row in read_transcript(run_dir / TRANSCRIPT)]
        run_config = _json_object(run_dir / CONFIG)
        bound = _json_object(run_dir / PROTOCOL)
        dims = {k: int(v) for k, v in bound["dims"].items()}
        top_b = dims["B"] if dims["B"] != dims["K"] else None
        statistics = {d: dims[d] for d in ("M", "S", "H", "G") if d in dims} if "M" in dims else None
        spec = builder_for(str(bound["name"]))(
            components=dims["K"],
            parameters=dims["P"],
            top_b=top_b,
            **({} if statistics is None else {"statistics": statistics}),
        )
    except (KeyError, TypeError, ValueError, AttributeError, ConfigError) as exc:
        raise RunDirectoryError(f"{run_dir}: corrupt run files ({exc})") from exc
    uplink = {f.name: f for s in spec.stages if s.sender == "client" for f in s.fields}

    problems: list[str] = []
    ledgers: dict[str, PrivacyLedger] = {}
    if (run_dir / LEDGERS).is_dir():
        for path in sorted((run_dir / LEDGERS).glob("*.json")):
            try:
                ledger = PrivacyLedger.load(path)
            except PrivacyError as exc:  # unreadable, or edited (its hash chain is broken)
                problems.append(f"{path.stem}: {exc}")
                continue
            ledgers[ledger.client_id] = ledger

    grouped: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["sender"] == SERVER or row.get("field") is None:
            continue
        grouped[(row["sender"], row["field"], row["kind"])].append(row)

    disclosures = []
    unprotected: dict[str, set[str]] = defaultdict(set)
    for (client, name, kind), items in sorted(grouped.items()):
        declared = uplink.get(name)
        if declared is None or declared.kind.value != kind:
            problems.append(
                f"{client} sent {name!r} as {kind}, which protocol {spec.name!r} does not declare"
            )
        packing = {r.get("packed_in") for r in items}
        if declared is not None and packing != {declared.packed_in}:
            problems.append(
                f"{client} sent {name!r} packed in {sorted(map(str, packing))}, protocol {spec.name!r} "
                f"declares {declared.packed_in!r}"
            )
        uncovered: tuple[str, ...] = ()
        if kind in (FieldKind.DP_RELEASE.value, FieldKind.CIPHERTEXT.value):
            # Encryption is the second layer: an encrypted field must be DP by itself too.
            owner = ledgers.get(client)
            uncovered = tuple(
                sorted(
                    {
                        str(r.get("event"))
                        for r in items
                        if owner is None or not owner.covers(r.get("event", ""))
                    }
                )
            )
            layered = "dp+encrypted" if kind == FieldKind.CIPHERTEXT.value else "dp"
            protection = (
                layered
                if not uncovered
                else ("encrypted only" if kind == FieldKind.CIPHERTEXT.value else "none")
            )
            if uncovered:
                problems.append(
                    f"{client}: {name!r} names events no ledger entry covers: {', '.join(uncovered)}"
                )
        elif kind == FieldKind.PUBLIC.value:
            protection = "public"
        else:
            protection = "none"
            unprotected[name].add(client)
        disclosures.append(
            Disclosure(
                client,
                name,
                kind,
                len(items),
                sum(int(r["bytes"]) for r in items),
                protection,
                uncovered,
                next(iter(packing)) if len(packing) == 1 else None,
            )
        )

    if run_config.get("dp_noise") == "seeded":
        problems.append(
            "DP noise was derived from the run seed (dp_noise='seeded', for tests only): anyone holding "
            "config.json can regenerate and subtract it, so no DP guarantee holds for this run"
        )
    problems += _plan_problems(run_dir, run_config, ledgers)
    received = _transcript_entries(rows, ledgers, problems)
    for name, clients in sorted(unprotected.items()):
        problems.append(f"{name!r} left {len(clients)} client(s) without protection (non-private)")
    budgets = []
    for client, ledger in sorted(ledgers.items()):
        spent = ledger.spent
        exceeded = spent > ledger.budget.epsilon * (1 + 1e-6)
        if exceeded:
            problems.append(
                f"{client}: spent epsilon {spent:.4f} exceeds its budget {ledger.budget.epsilon:g}"
            )
        seen = PrivacyLedger(
            client, ledger.budget, tuple(received.get(client, {}).values()), ledger.adjacency
        )
        if seen.spent > spent * (1 + 1e-6):
            problems.append(
                f"{client}: the releases the server received spend epsilon {seen.spent:.4f}, its ledger "
                f"claims {spent:.4f}"
            )
        budgets.append(
            ClientBudget(
                client,
                len(ledger.entries),
                spent,
                ledger.spent_pld(),
                ledger.spent_fallback,
                seen.spent,
                ledger.budget.delta,
                ledger.budget.epsilon,
                ledger.remaining,
                exceeded,
            )
        )
    return AuditReport(str(run_dir), spec.name, tuple(budgets), tuple(disclosures), tuple(problems))


def _json_object(path: Path) -> dict[str, Any]:
    value = read_json(path, JSON_FILE)  # a regular file within the cap: no FIFO, device or link
    if not isinstance(value, dict):
        raise ValueError(f"{path.name} does not hold a JSON object")
    return value


def _transcript_row(row: Any) -> dict[str, Any]:
    """A transcript line with the fields the audit reads, of the types it reads them as."""
    if not isinstance(row, dict) or not isinstance(row.get("sender"), str):
        raise ValueError(f"transcript line {row!r:.80} is not a record of a message")
    if row.get("field") is not None and not (
        isinstance(row["field"], str)
        and isinstance(row.get("kind"), str)
        and isinstance(row.get("bytes"), int)
    ):
        raise ValueError(f"transcript line {row!r:.80} lacks the field's kind or size")
    return row


def _transcript_entries(
    rows: list[dict[str, Any]], ledgers: dict[str, PrivacyLedger], problems: list[str]
) -> dict[str, dict[str, LedgerEntry]]:
    """Each client's releases as the server recorded them on arrival (a row's `dp_event`), by
    event id, each checked against that client's ledger entry. The transcript is written by
    the server, the ledger by the client: editing one alone disagrees with the other."""
    received: dict[str, dict[str, LedgerEntry]] = defaultdict(dict)
    reported: set[str] = set()
    recorded = {client: {e.event_id: e for e in ledger.entries} for client, ledger in ledgers.items()}
    for row in rows:
        client, event_id = row["sender"], row.get("event")
        if client == SERVER or event_id is None or row.get("status", "delivered") != "delivered":
            continue
        mine = recorded.get(client, {}).get(str(event_id))
        try:
            declared = row["dp_event"]
            name, _, at = str(event_id).rpartition("@round")
            entry = LedgerEntry(
                int(at),
                name,
                json.dumps(declared["event"], sort_keys=True),
                json.dumps(declared["fallback_event"], sort_keys=True)
                if "fallback_event" in declared
                else None,
            )
            entry.event, entry.fallback_event  # noqa: B018 - parse both: a garbled row is a problem
        except (KeyError, TypeError, ValueError, PrivacyError) as exc:
            why = (
                f"{client}: the transcript's record of its release {event_id} has no readable event ({exc!r})"
            )
        else:
            received[client][entry.event_id] = entry
            if mine is None or mine == entry:
                continue
            received_as, recorded_as = (json.dumps(e.parameters(), sort_keys=True) for e in (entry, mine))
            why = f"{client}: the server received {event_id} as {received_as}, "
            why += f"the client's ledger records {recorded_as}"
        if client not in reported:  # one line per client is enough to fail the audit
            reported.add(client)
            problems.append(why)
    return received


def _plan_problems(run_dir: Path, run_config: dict[str, Any], ledgers: dict[str, PrivacyLedger]) -> list[str]:
    """A ledger is not trusted on its own: every entry must be the event the run's plan
    (dp_plan.json) decided for that round, the plan must be for the configured budget and
    spend it, and each ledger's budget must be the plan's. A ledger edited alone (say, every
    noise multiplier inflated 10x, which would understate epsilon) disagrees with the plan."""
    if not ledgers:
        return []
    path = run_dir / PLAN
    try:
        plan: DpPlan | PrivateMixturePlan = plan_from_dict(read_json(path, JSON_FILE))
    except (OSError, ValueError, ConfigError, RunDirectoryError) as exc:
        return [f"{PLAN} is missing or unreadable ({exc}): the ledgers cannot be checked against the plan"]
    problems = []
    if (plan.epsilon, plan.delta) != (run_config.get("epsilon"), run_config.get("delta")):
        problems.append(
            f"{PLAN} is for (epsilon {plan.epsilon:g}, delta {plan.delta:g}), the configuration asks for "
            f"(epsilon {run_config.get('epsilon')}, delta {run_config.get('delta')})"
        )
    planned = plan.planned_epsilon()
    if not 0.98 * plan.epsilon <= planned <= plan.epsilon * (1 + 1e-6):
        problems.append(
            f"{PLAN} spends epsilon {planned:.4f} over its rounds, not its budget {plan.epsilon:g}: "
            "it is not the plan securegmi calibrates"
        )
    for client, ledger in sorted(ledgers.items()):
        if (ledger.budget.epsilon, ledger.budget.delta) != (plan.epsilon, plan.delta):
            problems.append(f"{client}: the ledger's budget {ledger.budget} is not the plan's")
        for entry in ledger.entries:
            expected = [e for e in plan.round_entries(entry.round) if e.name == entry.name]
            if entry.round >= plan.rounds or expected != [entry]:
                problems.append(
                    f"{client}: ledger entry {entry.event_id} records {entry.event_json}, the plan "
                    f"decided {expected[0].event_json if expected else 'no such release'}"
                )
                break  # one line per client is enough to fail the audit
    return problems
