"""The disclosure audit of a run directory: what left each client, under which protection, and
how much privacy it cost, derived from the protocol spec, the transcript, the ledgers, the plan
and the configuration. Besides what each record says, the audit counts: the clients against
the configuration, each ledger's entries against the plan's rounds and the transcript, each
release's digests, and the contributions to every sum whose noise was split (docs/design.md §2); and
it compares the transcript and the ledgers with the records the run writes beside them (the
server's saved state, the metrics or a Flower server's engine.json, each client's saved state,
results.json and the model), each checked where the directory has it."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from securegmi.config import SimulationConfig
from securegmi.crypto.signing import SignerRegistry
from securegmi.errors import ConfigError, PrivacyError, ProtocolViolation, RunDirectoryError
from securegmi.files import (
    JSON_FILE,
    METRICS_FILE,
    MODEL_FILE,
    STATE_FILE,
    read_json,
    read_text,
    require_regular,
    safetensors_metadata,
)
from securegmi.privacy.calibration import DpPlan, PrivateMixturePlan, plan_from_dict
from securegmi.privacy.ledger import PRIVATE_NOISE, SEEDED_NOISE, LedgerEntry, PrivacyLedger
from securegmi.protocol import SERVER, FieldKind, ProtocolSpec, read_transcript, registry
from securegmi.records.rundir import (
    AGGREGATE,
    CHECKPOINT,
    CLIENT_STATES,
    CONFIG,
    ENGINE,
    LEDGERS,
    METRICS,
    PLAN,
    PROTOCOL,
    RESULTS,
    SERVER_STATE,
    TRANSCRIPT,
)
from securegmi.records.signatures import NONE, check_signatures, load_signers
from securegmi.vocabulary import EventId, Placement, PrivateDesign

Plan = DpPlan | PrivateMixturePlan


@dataclass(frozen=True)
class ClientBudget:
    client: str
    releases: int
    epsilon: float  # by the PLD accountant: the figure held to the budget
    # The RDP cross-check: at least `epsilon`; above the budget for a plan calibrated on PLD
    # (RDP's looseness, not an overspend).
    epsilon_rdp: float
    epsilon_fallback: float  # against the server colluding with one client (split noise; PLD)
    # Recomputed from the events the server's transcript recorded as the releases arrived
    # (PLD); at most `epsilon`, or the ledger understates what was released.
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
    # What the transcript was checked against: the registered protocol, or (where the run's
    # protocol is not registered here) only the declaration the run recorded, which says so.
    declaration: str = "registered"
    # The clients' signatures: the registry they were checked against ("given": the auditor's,
    # "run directory": the directory's own copy, "none": an unsigned run), its fingerprint
    # (SHA-256 of its canonical JSON, to compare with the study's registration), how many
    # message and ledger-entry signatures verify, how many of the problems are the signature
    # check's, and what it notes.
    signers: str = NONE
    signers_fingerprint: str | None = None
    signed_messages: int = 0
    signed_entries: int = 0
    signature_problems: int = 0
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def audit_run(
    run_dir: Path,
    *,
    ledgers: Path | None = None,
    trust_recorded_protocol: bool = False,
    signers: Path | SignerRegistry | None = None,
) -> AuditReport:
    """The audit of `run_dir`. `ledgers`: the folder of the clients' ledgers (one
    `<client>.json` each) where the run directory holds none, as a Flower server's directory
    (each site keeps its own ledger: gather them into one folder). `trust_recorded_protocol`:
    accept a run under a protocol not registered here, checked against the declaration the run
    directory holds alone (without it, such a run does not pass: whoever wrote the directory
    could have declared every field public). `signers`: the registry of the clients' public
    signing keys the study registered (signers.json from the key ceremony, or its path): every
    client message and ledger entry must be signed under it. Without it the run directory's own
    copy is used, which shows the records self-consistent only (the report notes it)."""
    run_dir = Path(run_dir)
    registry = load_signers(signers) if isinstance(signers, str | Path) else signers
    if ledgers is not None:
        if not Path(ledgers).is_dir():
            raise RunDirectoryError(f"{ledgers} is not a folder of the clients' ledgers (<client>.json each)")
        if any((run_dir / LEDGERS).glob("*.json")):  # a server's directory has an empty one
            # Another folder in place of the run's own would hide an edit of the run's ledgers.
            raise RunDirectoryError(
                f"{run_dir} holds its own {LEDGERS}/: audit those (--ledgers is for a directory "
                "without them, as a Flower server's)"
            )
    ledger_dir = Path(ledgers) if ledgers is not None else run_dir / LEDGERS
    return _audit(run_dir, ledger_dir, trust_recorded_protocol, registry)


def _audit(
    run_dir: Path, ledger_dir: Path, trust_recorded_protocol: bool, signers: SignerRegistry | None
) -> AuditReport:
    problems: list[str] = []
    rows, run_config, config, recorded = _read_run_files(run_dir)
    spec, declaration = _declared_protocol(recorded, problems, trust_recorded_protocol)
    ledger_files = sorted(ledger_dir.glob("*.json")) if ledger_dir.is_dir() else []
    ledgers = _read_ledgers(ledger_files, problems)
    disclosures, unprotected = _disclosures(rows, spec, ledgers, problems)

    problems += _noise_problems(config, ledgers)
    private = config.epsilon is not None or bool(ledger_files)
    plan = _read_plan(run_dir, problems) if private else None
    if plan is not None:
        problems += _plan_problems(plan, run_config, ledgers)
        problems += _configuration_problems(config, plan, dict(spec.dims))
    problems += _protocol_problems(config, spec, plan)
    attempts = _round_attempts(rows)
    last = {a.round: a for a in attempts}  # a resumed round's last attempt is the one that counts
    if private:
        problems += _cohort_problems(config, {p.stem for p in ledger_files}, attempts)
    # The server's saved state and the per-round records (optional: a Flower server's directory
    # has engine.json and no metrics): written beside the transcript, never from it.
    state = _server_state(run_dir, problems)
    metrics = _metrics(run_dir, problems)
    if plan is not None:
        completed = _completed_rounds(run_dir, plan, attempts, state, metrics, problems)
        problems += _ledger_round_problems(plan, ledgers, last, completed)
        problems += _transcript_round_problems(ledgers, last, completed)
        problems += _split_cohort_problems(plan, last, completed)
    problems += _contribution_problems(state, last)
    problems += _refusal_problems(run_dir, metrics, last, problems)
    problems += _client_state_problems(run_dir, config, ledgers, {p.stem for p in ledger_files}, plan)
    problems += _results_problems(run_dir, config, spec.name)
    problems += _double_releases(rows)
    received = _transcript_entries(rows, ledgers, problems)
    for name, clients in sorted(unprotected.items()):
        problems.append(f"{name!r} left {len(clients)} client(s) without protection (non-private)")
    budgets = _budgets(ledgers, received, problems)
    signed = check_signatures(run_dir, rows, ledgers, spec.name, signers)
    problems += signed.problems
    return AuditReport(
        str(run_dir),
        spec.name,
        tuple(budgets),
        tuple(disclosures),
        tuple(problems),
        declaration,
        signed.source,
        signed.fingerprint,
        signed.messages,
        signed.entries,
        len(signed.problems),
        signed.notes,
    )


def _read_run_files(
    run_dir: Path,
) -> tuple[list[dict[str, Any]], dict[str, Any], SimulationConfig, ProtocolSpec]:
    """The transcript's rows, config.json (as written, and as a configuration) and the recorded
    protocol; a `RunDirectoryError` where one is missing or cannot be read."""
    files = [run_dir / name for name in (CONFIG, TRANSCRIPT, PROTOCOL)]
    if not all(f.exists() for f in files):
        raise RunDirectoryError(
            f"{run_dir} lacks {', '.join(f.name for f in files if not f.exists())}: "
            "not the run directory of a federated run"
        )
    try:
        rows = [_transcript_row(row) for row in read_transcript(run_dir / TRANSCRIPT)]
        run_config = _json_object(run_dir / CONFIG)
        config = SimulationConfig.from_dict(run_config)
        recorded = ProtocolSpec.from_json(_json_object(run_dir / PROTOCOL))
    except (KeyError, TypeError, ValueError, AttributeError, ConfigError) as exc:
        raise RunDirectoryError(f"{run_dir}: corrupt run files ({exc})") from exc
    return rows, run_config, config, recorded


def _read_ledgers(ledger_files: list[Path], problems: list[str]) -> dict[str, PrivacyLedger]:
    """Every readable ledger whose hash chain holds, under its own client's name."""
    ledgers: dict[str, PrivacyLedger] = {}
    for path in ledger_files:
        try:
            ledger = PrivacyLedger.load(path)
        except PrivacyError as exc:  # unreadable, or edited (its hash chain is broken)
            problems.append(f"{path.stem}: {exc}")
            continue
        if ledger.client_id != path.stem or ledger.client_id in ledgers:
            problems.append(f"{path.stem}: {LEDGERS}/{path.name} holds the ledger of {ledger.client_id!r}")
            continue
        ledgers[ledger.client_id] = ledger
    return ledgers


def _disclosures(
    rows: list[dict[str, Any]],
    spec: ProtocolSpec,
    ledgers: dict[str, PrivacyLedger],
    problems: list[str],
) -> tuple[list[Disclosure], dict[str, set[str]]]:
    """What each client sent, field by field, with its protection; and the fields that left
    some clients with none."""
    uplink = {f.name: f for s in spec.stages if s.sender == "client" for f in s.fields}
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
            uncovered = tuple(sorted({str(r.get("event")) for r in items if not _covered(owner, r)}))
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
    return disclosures, unprotected


def _covered(ledger: PrivacyLedger | None, row: dict[str, Any]) -> bool:
    """Whether `ledger` covers the event a transcript row names; a row naming no event, or
    one that is not an event id, is covered by none (a problem of the run, not of the audit)."""
    try:
        return ledger is not None and ledger.covers(str(row.get("event", "")))
    except ProtocolViolation:
        return False


def _budgets(
    ledgers: dict[str, PrivacyLedger],
    received: dict[str, dict[EventId, LedgerEntry]],
    problems: list[str],
) -> list[ClientBudget]:
    """Each client's spend: by its ledger, and re-accounted from what the server received."""
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
                ledger.spent_rdp,
                ledger.spent_fallback,
                seen.spent,
                ledger.budget.delta,
                ledger.budget.epsilon,
                ledger.remaining,
                exceeded,
            )
        )
    return budgets


def _declared_protocol(
    recorded: ProtocolSpec, problems: list[str], trust_recorded: bool
) -> tuple[ProtocolSpec, str]:
    """The declaration the transcript is checked against. protocol.json is written by the run
    and could be rewritten after it: where its protocol is registered here, the recorded spec
    must be the registry's binding at its own dimensions (a field's DP requirement dropped, an
    uplink field added, is a problem) and the registry's is the one checked against; where it
    is not registered, only the recorded declaration can be, and the report says so; unless the
    auditor trusts that declaration, that is a problem (it could declare every field public)."""
    if recorded.name not in registry.available():
        if not trust_recorded:
            problems.append(
                f"protocol {recorded.name!r} is not registered here: the declaration in {PROTOCOL} "
                "cannot be told from a rewritten one (it could call any field public); install the "
                "package that provides the protocol, or pass --trust-recorded-protocol "
                "(trust_recorded_protocol=True) to accept the recorded declaration"
            )
        return recorded, (
            f"recorded only: protocol {recorded.name!r} is not registered here (entry-point group "
            f"{registry.GROUP!r}), so the transcript is checked against the declaration in {PROTOCOL} "
            "as the run wrote it; install the package that provides the protocol to check that too"
        )
    try:
        expected = registry.rebind(recorded.name, recorded.dims)
    except ConfigError as exc:
        problems.append(
            f"{PROTOCOL}: protocol {recorded.name!r} cannot be bound at its recorded dimensions ({exc})"
        )
        return recorded, "registered"
    if expected != recorded:
        differs = _spec_differences(expected, recorded)
        problems.append(
            f"{PROTOCOL} is not protocol {recorded.name!r} as registered here, bound at its recorded "
            f"dimensions ({differs}): the transcript is checked against the registered declaration"
        )
    return expected, "registered"


def _spec_differences(expected: ProtocolSpec, recorded: ProtocolSpec) -> str:
    """Where `recorded` departs from `expected`, field by field, at most a few places named."""
    found: list[str] = []
    for key in ("description", "release", "codec"):
        if getattr(expected, key) != getattr(recorded, key):
            found.append(f"{key} {getattr(recorded, key)!r}, registered {getattr(expected, key)!r}")
    ours = {s.name: s for s in expected.stages}
    theirs = {s.name: s for s in recorded.stages}
    found += [f"stage {n!r} undeclared" for n in sorted(set(theirs) - set(ours))]
    found += [f"stage {n!r} missing" for n in sorted(set(ours) - set(theirs))]
    for name in sorted(set(ours) & set(theirs)):
        mine = {f.name: f for f in ours[name].fields}
        other = {f.name: f for f in theirs[name].fields}
        found += [f"{name}.{n} undeclared" for n in sorted(set(other) - set(mine))]
        found += [f"{name}.{n} missing" for n in sorted(set(mine) - set(other))]
        found += [
            f"{name}.{n} recorded {other[n].kind.value}, registered {mine[n].kind.value}"
            if other[n].kind is not mine[n].kind
            else f"{name}.{n} recorded otherwise"
            for n in sorted(set(mine) & set(other))
            if other[n] != mine[n]
        ]
        if ours[name].sender != theirs[name].sender or ours[name].min_shares != theirs[name].min_shares:
            found.append(f"stage {name!r} recorded otherwise")
    if [s.name for s in expected.stages] != [s.name for s in recorded.stages] and not found:
        found.append("stages in another order")
    return _listed(found) if found else "recorded otherwise"


def _json_object(path: Path) -> dict[str, Any]:
    value = read_json(path, JSON_FILE)  # a regular file within the cap: no FIFO, device or link
    if not isinstance(value, dict):
        raise ValueError(f"{path.name} does not hold a JSON object")
    return value


def _transcript_row(row: Any) -> dict[str, Any]:
    """A transcript line with the fields the audit reads, of the types it reads them as."""
    if not isinstance(row, dict) or not isinstance(row.get("sender"), str):
        raise ValueError(f"transcript line {row!r:.80} is not a record of a message")
    if not (isinstance(row.get("round"), int) and isinstance(row.get("receiver"), str)):
        raise ValueError(f"transcript line {row!r:.80} lacks its round or receiver")
    if not all(isinstance(row.get(k, ""), str) for k in ("status", "sha256")):
        raise ValueError(f"transcript line {row!r:.80} has a status or digest that is not text")
    if row.get("field") is not None and not (
        isinstance(row["field"], str)
        and isinstance(row.get("kind"), str)
        and isinstance(row.get("bytes"), int)
    ):
        raise ValueError(f"transcript line {row!r:.80} lacks the field's kind or size")
    return row


def _transcript_entries(
    rows: list[dict[str, Any]], ledgers: dict[str, PrivacyLedger], problems: list[str]
) -> dict[str, dict[EventId, LedgerEntry]]:
    """Each client's releases as the server recorded them on arrival (a row's `dp_event`), by
    event id, each checked against that client's ledger entry. The transcript is written by
    the server, the ledger by the client: editing one alone disagrees with the other."""
    received: dict[str, dict[EventId, LedgerEntry]] = defaultdict(dict)
    reported: set[str] = set()
    recorded = {client: {e.event_id: e for e in ledger.entries} for client, ledger in ledgers.items()}
    for row in rows:
        client, event_id = row["sender"], row.get("event")
        if client == SERVER or event_id is None or row.get("status", "delivered") != "delivered":
            continue
        try:
            declared = row["dp_event"]
            at = EventId.parse(event_id)
            entry = LedgerEntry(
                at.round,
                at.name,
                json.dumps(declared["event"], sort_keys=True),
                json.dumps(declared["fallback_event"], sort_keys=True)
                if "fallback_event" in declared
                else None,
            )
            entry.event, entry.fallback_event  # noqa: B018 - parse both: a garbled row is a problem
        except (KeyError, TypeError, ValueError, PrivacyError, ProtocolViolation) as exc:
            why = (
                f"{client}: the transcript's record of its release {event_id} has no readable event ({exc!r})"
            )
        else:
            received[client][at] = entry
            mine = recorded.get(client, {}).get(at)
            if mine is None or mine == entry:
                continue
            received_as, recorded_as = (json.dumps(e.parameters(), sort_keys=True) for e in (entry, mine))
            why = f"{client}: the server received {event_id} as {received_as}, "
            why += f"the client's ledger records {recorded_as}"
        if client not in reported:  # one line per client is enough to fail the audit
            reported.add(client)
            problems.append(why)
    return received


def _read_plan(run_dir: Path, problems: list[str]) -> Plan | None:
    """The run's plan (dp_plan.json), or None with a problem: a private run's ledgers, rounds and
    cohort are all checked against it."""
    try:
        plan = plan_from_dict(read_json(run_dir / PLAN, JSON_FILE))
        plan.planned_epsilon()  # every round's entries, built now: a plan of the wrong types fails here
    except (
        OSError,
        ValueError,
        TypeError,
        KeyError,
        ArithmeticError,
        ConfigError,
        PrivacyError,
        RunDirectoryError,
    ) as exc:
        problems.append(
            f"{PLAN} is missing or unreadable ({exc}): the ledgers cannot be checked against the plan"
        )
        return None
    return plan


def _plan_problems(plan: Plan, run_config: dict[str, Any], ledgers: dict[str, PrivacyLedger]) -> list[str]:
    """A ledger is not trusted on its own: every entry must be the event the run's plan
    (dp_plan.json) decided for that round, the plan must be for the configured budget and
    spend it, and each ledger's budget must be the plan's. A ledger edited alone (say, every
    noise multiplier inflated 10x, which would understate epsilon) disagrees with the plan."""
    problems = []
    if (plan.epsilon, plan.delta) != (run_config.get("epsilon"), run_config.get("delta")):
        problems.append(
            f"{PLAN} is for (epsilon {plan.epsilon:g}, delta {plan.delta:g}), the configuration asks for "
            f"(epsilon {run_config.get('epsilon')}, delta {run_config.get('delta')})"
        )
    # Calibrated to spend the budget by its own accountant (RDP for a plan written before PLD
    # was primary), and never more than the budget by the primary one (PLD, at most RDP).
    calibrated, planned = plan.planned_epsilon(plan.accountant), plan.planned_epsilon()
    # Written as "not within" so that a NaN figure fails too.
    ceiling = plan.epsilon * (1 + 1e-6)
    if not (0.98 * plan.epsilon <= calibrated <= ceiling and planned <= ceiling):
        problems.append(
            f"{PLAN} spends epsilon {calibrated:.4f} by {plan.accountant.upper()} ({planned:.4f} by PLD) "
            f"over its rounds, not its budget {plan.epsilon:g}: it is not the plan securegmi calibrates"
        )
    for client, ledger in sorted(ledgers.items()):
        if (ledger.budget.epsilon, ledger.budget.delta) != (plan.epsilon, plan.delta):
            problems.append(f"{client}: the ledger's budget {ledger.budget} is not the plan's")
        for entry in ledger.entries:
            expected = [e for e in plan.round_entries(entry.round) if e.name == entry.name]
            if entry.round >= plan.rounds or expected != [entry]:
                # The event and, under split noise, its fallback: either may be what differs.
                recorded = json.dumps(entry.parameters(), sort_keys=True)
                decided = json.dumps(expected[0].parameters(), sort_keys=True) if expected else None
                problems.append(
                    f"{client}: ledger entry {entry.event_id} records {recorded}, the plan "
                    f"decided {decided or 'no such release'}"
                )
                break  # one line per client is enough to fail the audit
    return problems


def _noise_problems(config: SimulationConfig, ledgers: dict[str, PrivacyLedger]) -> list[str]:
    """Seeded noise (tests only) voids the guarantee. Each ledger's first link holds where its
    client's noise came from, so a run whose config.json was relabelled 'private' still fails:
    the ledgers say seeded, whatever the configuration says."""
    problems = []
    if config.dp_noise == SEEDED_NOISE:
        problems.append(
            "DP noise was derived from the run seed (dp_noise='seeded', for tests only): anyone holding "
            "config.json can regenerate and subtract it, so no DP guarantee holds for this run"
        )
    for client, ledger in sorted(ledgers.items()):
        source = ledger.noise_source
        if source != PRIVATE_NOISE:
            why = (
                "seeded DP noise (derived from the run seed, for tests only: it can be regenerated and "
                "subtracted)"
                if source == SEEDED_NOISE
                else "no source for its DP noise (written before securegmi recorded it, or by other code)"
            )
            problems.append(
                f"{client}: its ledger records {why}, config.json says dp_noise {config.dp_noise!r}: "
                "no DP guarantee holds for its releases"
            )
    return problems


def _configuration_problems(config: SimulationConfig, plan: Plan, dims: dict[str, int]) -> list[str]:
    """The public settings the plan was calibrated from must be the configuration's: a plan with
    other rounds, another noise placement or another minimum cohort is not this run's."""
    pairs: list[tuple[str, object, object]] = [
        ("planned rounds", config.planned_rounds, plan.rounds),
        ("sample_rate", config.sample_rate, plan.sample_rate),
        ("clip_norm", config.clip_norm, plan.clip_norm),
    ]
    if isinstance(plan, PrivateMixturePlan):
        stats = plan.statistics
        pairs += [
            ("private_training", config.private_training, PrivateDesign.STATISTICS),
            ("noise_placement", config.placement, stats.placement),
            ("min_clients", config.cohort_minimum, stats.min_clients),
            ("sgd_placement", config.dp_sgd_placement, plan.sgd_placement),
            ("vae_rounds", config.vae_rounds, plan.vae_rounds),
            ("kmeans_iterations", config.statistics_sizes.kmeans_iterations, stats.iterations),
            ("fine_clusters", config.statistics_sizes.fine_clusters, stats.clusters),
            ("statistics_share", config.statistics_share, plan.statistics_share),
            ("identifier_steps", config.planned_identifier_steps, plan.identifier_steps),
            # the histogram holds one block of fine clusters per client of the cohort
            ("clients x fine clusters", config.clients * stats.clusters, dims.get("H")),
        ]
    else:
        pairs += [
            ("private_training", config.private_training, PrivateDesign.EM),
            ("noise_placement", config.placement, Placement.LOCAL),  # the em design's noise is local
            ("count_share", config.count_share, plan.count_share),
        ]
    if isinstance(plan, PrivateMixturePlan) and plan.identifier_steps:
        pairs.append(("identifier_share", config.identifier_share, plan.identifier_share))
    problems = [
        f"config.json gives {name} {ours!r}, {PLAN} (or {PROTOCOL}) {theirs!r}: the plan is not this run's"
        for name, ours, theirs in pairs
        if ours != theirs
    ]
    if isinstance(plan, PrivateMixturePlan) and dims.get("N") != plan.statistics.min_clients:
        # N is the fewest shares a split sum may add, which both ends check the server's count
        # against: a protocol bound to a smaller N would let a sum of fewer shares through.
        problems.append(
            f"{PROTOCOL} binds N (the fewest client shares a sum may add) to {dims.get('N')}, {PLAN} plans "
            f"a minimum cohort of {plan.statistics.min_clients}: the protocol is not this run's"
        )
    return problems


def _protocol_problems(config: SimulationConfig, spec: ProtocolSpec, plan: Plan | None) -> list[str]:
    """The protocol the transcript is checked against (protocol.json) must be the configuration's,
    and a split noise placement needs a protocol whose releases travel under CKKS: a split share
    carries sigma / sqrt(min_clients - 1) only, so each one sent in the clear reaches the server
    with less than the planned noise."""
    problems = []
    if config.protocol != spec.name:
        problems.append(
            f"config.json gives protocol {config.protocol!r}, {PROTOCOL} names {spec.name!r}: the "
            "transcript was recorded under another protocol than the configuration's"
        )
    placements: list[tuple[str, str]] = [
        ("config.json noise_placement", config.placement),
        ("config.json sgd_placement", config.dp_sgd_placement),
    ]
    if isinstance(plan, PrivateMixturePlan):
        placements += [
            (f"{PLAN} placement", plan.statistics.placement),
            (f"{PLAN} sgd_placement", plan.sgd_placement),
        ]
    split = [name for name, placement in placements if placement == Placement.SPLIT]
    if split and spec.codec != "ckks":
        problems.append(
            f"{', '.join(split)} split the noise across clients, protocol {spec.name!r} ({PROTOCOL}) has "
            f"codec {spec.codec!r}: each split share (sigma / sqrt(min_clients - 1)) reached the server "
            "unencrypted, with less than the planned noise"
        )
    return problems


@dataclass(frozen=True)
class _Attempt:
    """One attempt at a round as the server's transcript records it, from the server's first
    message of the round to its next round (or to a resumed server's second try at this one)."""

    round: int
    addressed: frozenset[str]  # clients the server sent this round's message to
    delivered: frozenset[str]  # clients whose reply to this round arrived with its fields
    refused: frozenset[str]  # clients the server recorded a refusal of (theirs, or its own)

    @property
    def contributions(self) -> frozenset[str]:
        """The distinct client uploads the round's sum added."""
        return (self.delivered & self.addressed) - self.refused


def _round_attempts(rows: list[dict[str, Any]]) -> list[_Attempt]:
    """The transcript cut into round attempts. The server sends each client one message per
    attempt, so a second message of the same round to the same client (same field) starts
    another attempt: a run killed mid-round and resumed plays that round again."""
    attempts: list[_Attempt] = []
    current: dict[str, Any] | None = None

    def close() -> None:
        if current is not None:
            attempts.append(
                _Attempt(
                    current["round"],
                    frozenset(current["addressed"]),
                    frozenset(current["delivered"]),
                    frozenset(current["refused"]),
                )
            )

    for row in rows:
        if row["sender"] == SERVER:
            key = (row["receiver"], row.get("field"))
            if current is None or row["round"] != current["round"] or key in current["sent"]:
                close()
                current = {"round": row["round"], "sent": set(), "addressed": set(), "delivered": set()}
                current["refused"] = set()
            current["sent"].add(key)
            current["addressed"].add(row["receiver"])
        elif current is not None:
            status = row.get("status", "delivered")
            if status == "delivered" and row.get("field") is not None and row["round"] == current["round"]:
                current["delivered"].add(row["sender"])
            elif status == "refused":
                current["refused"].add(row["sender"])
    close()
    return attempts


def _cohort_problems(config: SimulationConfig, ledger_files: set[str], attempts: list[_Attempt]) -> list[str]:
    """Every client of the configuration has a ledger and was addressed by the server; deleting
    one client's ledger together with its transcript rows leaves a cohort one short."""
    addressed = frozenset().union(*(a.addressed for a in attempts))
    problems = [
        f"config.json has {config.clients} clients, {where} {count}: a client's records are missing or extra"
        for where, count in (
            (f"{LEDGERS}/ holds ledgers of", len(ledger_files)),
            ("the server addressed", len(addressed)),
        )
        if count != config.clients
    ]
    problems += [
        f"{c}: the server addressed it, but {LEDGERS}/ holds no ledger of it"
        for c in sorted(addressed - ledger_files)
    ]
    problems += [
        f"{c}: it has a ledger, but the server never addressed it" for c in sorted(ledger_files - addressed)
    ]
    return problems


@dataclass(frozen=True)
class _ServerState:
    """What `server-state.safetensors` says of the server's last completed round."""

    next_round: int
    aggregated: int | None  # the last round whose replies the server added
    contributions: int  # how many replies those sums add


def _server_state(run_dir: Path, problems: list[str]) -> _ServerState | None:
    """The server's saved state, or None where the directory has none (a Flower server's) or it
    is unreadable (a problem)."""
    if not (run_dir / SERVER_STATE).exists():
        return None
    try:
        metadata = safetensors_metadata(run_dir / SERVER_STATE, STATE_FILE)  # a regular file, header only
        aggregated, contributions = (json.loads(metadata[k]) for k in ("aggregated", "contributions"))
        if not (isinstance(aggregated, int | None) and isinstance(contributions, int)):
            raise ValueError(f"aggregated {aggregated!r}, contributions {contributions!r}")
        return _ServerState(int(metadata["next_round"]), aggregated, contributions)
    except (OSError, RunDirectoryError, KeyError, ValueError) as exc:
        problems.append(
            f"{SERVER_STATE} is unreadable ({exc}): the server's own record of its rounds cannot be checked"
        )
        return None


def _metrics(run_dir: Path, problems: list[str]) -> list[tuple[int, int]] | None:
    """(round, refused replies) of each line of metrics.jsonl, or None where there is none (a
    Flower server's directory) or it is unreadable (a problem)."""
    if not (run_dir / METRICS).exists():
        return None
    try:
        lines = read_text(run_dir / METRICS, METRICS_FILE).splitlines()
        rows = []
        for line in filter(str.strip, lines):
            row = json.loads(line)
            if not (isinstance(row["round"], int) and isinstance(row["refused"], int)):
                raise ValueError(f"round {row['round']!r}, refused {row['refused']!r}")
            rows.append((row["round"], row["refused"]))
        return rows
    except (OSError, ValueError, KeyError, TypeError) as exc:
        problems.append(f"{METRICS} is unreadable ({exc}): the run's record of its rounds cannot be checked")
        return None


def _completed_rounds(
    run_dir: Path,
    plan: Plan,
    attempts: list[_Attempt],
    state: _ServerState | None,
    metrics: list[tuple[int, int]] | None,
    problems: list[str],
) -> int:
    """How many rounds the run completed, by every record that says: a finished run (results,
    model, final aggregate) completed its plan; otherwise the server's saved state, the metrics
    and the transcript (a round was broadcast only after the one before it was added)."""
    if any((run_dir / name).exists() for name in (RESULTS, CHECKPOINT, AGGREGATE)):
        return plan.rounds
    counts = [max((a.round for a in attempts), default=0)]
    if state is not None:
        counts.append(state.next_round)
    counts += [r + 1 for r, _ in metrics or ()]
    if max(counts) > plan.rounds:
        problems.append(f"the records show {max(counts)} rounds played, {PLAN} plans {plan.rounds}")
    return min(max(counts), plan.rounds)


def _ledger_round_problems(
    plan: Plan, ledgers: dict[str, PrivacyLedger], last: dict[int, _Attempt], completed: int
) -> list[str]:
    """Each ledger holds the plan's entries of every round the run completed, each once. A
    client may lack a round only where the server's transcript records its refusal and no reply
    (it dropped out before committing). A hash chain's prefix still verifies: a ledger cut at
    its tail together with that client's transcript rows is caught here."""
    problems = []
    for client, ledger in sorted(ledgers.items()):
        held = Counter(e.event_id for e in ledger.entries)
        twice = sorted(str(event) for event, n in held.items() if n > 1)
        if twice:
            problems.append(f"{client}: its ledger holds {', '.join(twice)} more than once")
        missing: list[str] = []
        for r in range(completed):
            absent = [str(e.event_id) for e in plan.round_entries(r) if e.event_id not in held]
            attempt = last.get(r)
            excused = attempt is not None and client in attempt.refused and client not in attempt.delivered
            if absent and not excused:
                missing += absent
        if missing:
            problems.append(
                f"{client}: its ledger holds {len(ledger.entries)} entries and lacks {', '.join(missing)} of "
                f"the {completed} rounds the run completed, where the transcript records no refusal of it"
            )
    return problems


def _transcript_round_problems(
    ledgers: dict[str, PrivacyLedger], last: dict[int, _Attempt], completed: int
) -> list[str]:
    """The server's transcript holds every round the run completed, and in each the message to
    every client and that client's reply or refusal."""
    problems = [
        f"the transcript holds no message of round {r}, which the run completed"
        for r in range(completed)
        if r not in last
    ]
    for client in sorted(ledgers):
        for r in range(completed):
            attempt = last.get(r)
            if attempt is None:
                continue
            if client not in attempt.addressed:
                problems.append(f"{client}: the transcript records no message to it in round {r}")
                break
            if client not in attempt.delivered and client not in attempt.refused:
                problems.append(
                    f"{client}: the transcript records neither its reply nor a refusal in round {r}"
                )
                break  # one line per client is enough to fail the audit
    return problems


def _split_cohort_problems(plan: Plan, last: dict[int, _Attempt], completed: int) -> list[str]:
    """Where the plan splits a release's noise across clients (each adds sigma / sqrt(m_min - 1)),
    the sum carries the full noise only if it adds at least m_min distinct uploads: count them."""
    if not isinstance(plan, PrivateMixturePlan):
        return []
    minimum = plan.statistics.min_clients
    problems = []
    for r in range(completed):
        split = [str(e.event_id) for e in plan.round_entries(r) if e.fallback_json is not None]
        attempt = last.get(r)
        summed = 0 if attempt is None else len(attempt.contributions)
        if split and summed < minimum:
            problems.append(
                f"round {r}: the sum of {', '.join(split)} (split noise) added {summed} client uploads, the "
                f"plan's minimum cohort is {minimum}: it carries less than the planned noise"
            )
    return problems


def _listed(items: list[str], at_most: int = 3) -> str:
    shown = ", ".join(items[:at_most])
    return shown if len(items) <= at_most else f"{shown} and {len(items) - at_most} more"


def _contribution_problems(state: _ServerState | None, last: dict[int, _Attempt]) -> list[str]:
    """The server's saved state says how many replies its last sums add; the transcript must
    record as many added in that round (replies received, less those refused). A client's reply
    cut from the transcript, or replaced by a refusal row, leaves the server's own count over."""
    if state is None or state.aggregated is None:
        return []
    r = state.aggregated
    attempt = last.get(r)
    added = frozenset() if attempt is None else attempt.contributions
    if len(added) == state.contributions:
        return []
    others = sorted(set() if attempt is None else attempt.addressed - added)
    none_from = f", none from {', '.join(others)}" if others and len(added) < state.contributions else ""
    return [
        f"round {r}: {SERVER_STATE} says the server's sums of that round add {state.contributions} client "
        f"uploads, the transcript records {len(added)} added{none_from}: the transcript is not the "
        "server's record of that round"
    ]


def _engine_refusals(run_dir: Path, problems: list[str]) -> list[frozenset[str]] | None:
    """The clients refused in each round as a Flower server's engine.json records them."""
    if not (run_dir / ENGINE).exists():
        return None
    try:
        rounds = _json_object(run_dir / ENGINE)["refused"]
        if not (isinstance(rounds, list) and all(isinstance(r, dict) for r in rounds)):
            raise ValueError(f"refused is {rounds!r:.80}, not a list of {{client: reason}} per round")
        return [frozenset(map(str, r)) for r in rounds]
    except (OSError, ValueError, KeyError) as exc:
        problems.append(f"{ENGINE} is unreadable ({exc}): the refusals it counts cannot be checked")
        return None


def _refusal_problems(
    run_dir: Path, metrics: list[tuple[int, int]] | None, last: dict[int, _Attempt], problems: list[str]
) -> list[str]:
    """The refusals of each round as the run counted them (metrics.jsonl in a simulation,
    engine.json on Flower) must be those the transcript records: a client's reply replaced by
    a forged refusal row (which excuses its ledger from that round) is one refusal over."""
    found = []
    for r, counted in metrics or ():
        attempt = last.get(r)
        if attempt is None:  # a round missing from the transcript is reported as such
            continue
        if counted != len(attempt.refused):
            named = f" ({', '.join(sorted(attempt.refused))})" if attempt.refused else ""
            found.append(
                f"round {r}: {METRICS} counts {counted} refused replies, the transcript records "
                f"{len(attempt.refused)}{named}: the transcript is not the run's record of that round"
            )
    for r, refused in enumerate(_engine_refusals(run_dir, problems) or ()):
        attempt = last.get(r)
        recorded = frozenset() if attempt is None else attempt.refused
        if refused != recorded:
            found.append(
                f"round {r}: {ENGINE} records refusals of [{', '.join(sorted(refused))}], the transcript "
                f"of [{', '.join(sorted(recorded))}]: the transcript is not the run's record of that round"
            )
    return found


def _client_state_problems(
    run_dir: Path,
    config: SimulationConfig,
    ledgers: dict[str, PrivacyLedger],
    ledger_files: set[str],
    plan: Plan | None,
) -> list[str]:
    """Each client saves its state (client-states/, where it keeps it here) after its ledger
    file and before its reply leaves: the state's copy of the ledger, and the round of its last
    reply (its outbox), say what the ledger file held then. A ledger file only grows, so it must
    hold every entry of that copy and every release of that round; a tail cut from the file (a
    prefix of its chain still verifies) contradicts it. Only seeded (test-only) noise has a
    state, which is never saved for private noise: a state holding one in a run that claims
    private noise says the noise was seeded."""
    folder = run_dir / CLIENT_STATES
    if not folder.is_dir():
        return []  # a Flower server's directory: each node keeps its own state
    problems = []
    for path in sorted(folder.glob("*.safetensors")):
        client, where = path.stem, f"{CLIENT_STATES}/{path.name}"
        try:
            metadata = safetensors_metadata(path, STATE_FILE)
            copy = PrivacyLedger.from_json(json.loads(metadata["ledger"])) if "ledger" in metadata else None
            answered = int(json.loads(metadata["outbox"])["round"]) if "outbox" in metadata else None
        except (OSError, RunDirectoryError, PrivacyError, ValueError, KeyError, TypeError) as exc:
            problems.append(f"{client}: {where} is unreadable ({exc})")
            continue
        if metadata.get("client") != client:
            problems.append(f"{client}: {where} holds the state of {metadata.get('client')!r}")
            continue
        ledger = ledgers.get(client)
        claimed = {config.dp_noise, None if ledger is None else ledger.noise_source}
        if "noise" in metadata and PRIVATE_NOISE in claimed:
            problems.append(
                f"{client}: {where} holds the state of seeded DP noise (only seeded, test-only noise is ever "
                "saved), the run claims private noise: no DP guarantee holds for its releases"
            )
        if copy is None:
            continue
        if ledger is None:
            if client not in ledger_files:  # an unreadable ledger file is reported as such
                problems.append(f"{client}: {where} holds a copy of its ledger, {LEDGERS}/ holds none")
            continue
        lacks = [str(e.event_id) for e in copy.entries if not ledger.covers(e.event_id)]
        differs = [
            str(e.event_id) for e in copy.entries if ledger.covers(e.event_id) and e not in ledger.entries
        ]
        if plan is not None and answered is not None and 0 <= answered < plan.rounds:
            lacks += [
                str(e.event_id)
                for e in plan.round_entries(answered)
                if not ledger.covers(e.event_id) and str(e.event_id) not in lacks
            ]
        if lacks or differs:
            said = [f"lacks {_listed(lacks)}"] if lacks else []
            said += [f"records {_listed(differs)} otherwise"] if differs else []
            after = "" if answered is None else f", saved with its reply to round {answered},"
            problems.append(
                f"{client}: {where}{after} holds a copy of its ledger, and {LEDGERS}/{client}.json "
                f"{' and '.join(said)}: the ledger file was edited after the client wrote it"
            )
    return problems


def _results_problems(run_dir: Path, config: SimulationConfig, protocol: str) -> list[str]:
    """results.json and the model are written by the run, not by the clients or the server's
    transcript: their count of clients, their protocol and their noise source must be the
    configuration's. A client erased from every other record is still in them."""
    problems = []
    counts: list[tuple[str, object]] = []
    if (run_dir / RESULTS).exists():
        try:
            results = _json_object(run_dir / RESULTS)
        except (OSError, ValueError) as exc:
            return [f"{RESULTS} is unreadable ({exc}): its record of the run cannot be checked"]
        counts.append((f"{RESULTS} reports", results.get("clients")))
        if isinstance(results.get("per_client"), list):
            counts.append((f"{RESULTS} evaluates", len(results["per_client"])))
        if "protocol" in results and results["protocol"] != protocol:
            problems.append(
                f"{RESULTS} reports protocol {results['protocol']!r}, {PROTOCOL} names {protocol!r}: the "
                "results are not this transcript's run"
            )
        privacy = results.get("epsilon")
        expected = {"noise": config.dp_noise, "secure_rng": config.dp_noise == PRIVATE_NOISE}
        if isinstance(privacy, dict) and any(k in privacy and privacy[k] != v for k, v in expected.items()):
            problems.append(
                f"{RESULTS} says the DP noise was {privacy.get('noise')!r} (secure_rng "
                f"{privacy.get('secure_rng')!r}), config.json says dp_noise {config.dp_noise!r}: the "
                "configuration does not say where this run's noise came from"
            )
    if (run_dir / CHECKPOINT).exists():
        try:
            require_regular(run_dir / CHECKPOINT, MODEL_FILE)  # safetensors opens it by its path
            with safe_open(str(run_dir / CHECKPOINT), framework="numpy") as fh:
                if "pi" in fh.keys():  # noqa: SIM118 - a safetensors handle is not a mapping
                    counts.append(
                        (f"{CHECKPOINT} holds the mixture weights (pi) of", fh.get_slice("pi").get_shape()[0])
                    )
        except (OSError, SafetensorError, IndexError, RunDirectoryError) as exc:
            problems.append(f"{CHECKPOINT} is unreadable ({exc}): its count of clients cannot be checked")
    problems[:0] = [
        f"config.json has {config.clients} clients, {where} {n}: a client's records are missing or extra"
        for where, n in counts
        if n != config.clients
    ]
    return problems


def _double_releases(rows: list[dict[str, Any]]) -> list[str]:
    """A (round, client, field) the server received twice with different contents is one release
    drawn twice (each charged once). Resending the identical bytes (a resumed round) is not."""
    digests: dict[tuple[str, int, str], set[str]] = defaultdict(set)
    for row in rows:
        if (
            row["sender"] != SERVER
            and row.get("field") is not None
            and row.get("status", "delivered") == "delivered"
        ):
            digests[(row["sender"], row["round"], row["field"])].add(str(row.get("sha256")))
    problems = []
    reported: set[str] = set()
    for (client, r, name), contents in sorted(digests.items()):
        if len(contents) > 1 and client not in reported:
            reported.add(client)  # one line per client is enough to fail the audit
            problems.append(
                f"{client}: the server received {name!r} of round {r} {len(contents)} times with different "
                f"contents (sha256 {', '.join(d[:12] for d in sorted(contents))}): a release drawn twice"
            )
    return problems
