"""One privacy ledger per client for the whole run: a value, checked before it is committed.

Like dp-accounting's events, a ledger is immutable: `check` returns the projected ledger or
raises, and the caller persists the projected ledger (write-ahead) before any message leaves.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import dp_accounting

from securegmi.errors import BudgetExceededError, ConfigError, PrivacyError, ProtocolViolation
from securegmi.files import LEDGER_FILE, read_json, write_atomic
from securegmi.privacy.accounting import ADJACENCY, PRIMARY, epsilon_pld, epsilon_rdp
from securegmi.privacy.events import event_from_json, event_to_json
from securegmi.vocabulary import EventId

# Slack for floating-point noise in the accountant when a plan is calibrated exactly to budget.
_RELATIVE_SLACK = 1e-6

# Where a client's DP noise comes from, bound into its ledger's first link. "private": OS
# entropy. "seeded": reproducible from the run seed, for tests only (anyone holding config.json
# can regenerate and subtract it). "unknown": a ledger built without saying, or written before
# the source was recorded; the audit fails both of the latter.
PRIVATE_NOISE = "private"
SEEDED_NOISE = "seeded"
UNKNOWN_NOISE = "unknown"
NOISE_SOURCES = (PRIVATE_NOISE, SEEDED_NOISE, UNKNOWN_NOISE)


@dataclass(frozen=True)
class PrivacyBudget:
    """The whole run's (epsilon, delta) per client."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ConfigError(f"epsilon must be a positive finite number, got {self.epsilon!r}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta!r}")


@dataclass(frozen=True)
class LedgerEntry:
    """One data-derived release: the round, what was released, and the event that covers it."""

    round: int
    name: str
    event_json: str  # canonical JSON of the DpEvent (see privacy.events)
    # Under split noise: the event against the server colluding with one client, who can
    # decrypt one client's under-noised share (docs/design.md §2). None: the same as `event_json`.
    fallback_json: str | None = None

    @classmethod
    def of(
        cls,
        round_index: int,
        name: str,
        event: dp_accounting.DpEvent,
        fallback: dp_accounting.DpEvent | None = None,
    ) -> LedgerEntry:
        canonical = json.dumps(event_to_json(event), sort_keys=True)
        weaker = None if fallback is None else json.dumps(event_to_json(fallback), sort_keys=True)
        return cls(round_index, name, canonical, None if weaker == canonical else weaker)

    @property
    def event(self) -> dp_accounting.DpEvent:
        return event_from_json(json.loads(self.event_json))

    @property
    def fallback_event(self) -> dp_accounting.DpEvent:
        return event_from_json(json.loads(self.fallback_json or self.event_json))

    @property
    def event_id(self) -> EventId:
        """The id a DpRelease field names: what was released in which round."""
        return EventId(self.name, self.round)

    def parameters(self) -> dict[str, Any]:
        """The event (and the fallback event, under split noise) as the ledger file holds them,
        and as a message carrying this release declares them to the server's transcript."""
        return {"event": json.loads(self.event_json)} | (
            {} if self.fallback_json is None else {"fallback_event": json.loads(self.fallback_json)}
        )


def _event_id(event_id: EventId | str) -> EventId:
    """An id as given, or parsed from its text (ProtocolViolation if it is no event id)."""
    return EventId.parse(event_id) if isinstance(event_id, str) else event_id


def _genesis(client_id: str, budget: Any, adjacency: str, noise: str | None) -> str:
    """The chain's first link: who the ledger is for, its budget, and where its noise comes
    from (None: a ledger written before the noise source was recorded, whose first link does
    not hold it)."""
    head: dict[str, Any] = {"client": client_id, "budget": budget, "adjacency": adjacency}
    if noise is not None:
        head["noise"] = noise
    return hashlib.sha256(json.dumps(head, sort_keys=True).encode()).hexdigest()


LEDGER_ENTRY_DOMAIN = "securegmi/ledger-entry/v1"
_UNCHAINED = ("chain", "signature")  # an entry's keys its link does not hash


def entry_statement(client_id: str, index: int, link: str) -> bytes:
    """What a client signs for its ledger's entry `index`: the entry's chain link (which hashes
    every entry before it and the first link: client, budget, noise source), domain-separated
    (canonical JSON, as crypto.signing.statement writes it)."""
    content = {"domain": LEDGER_ENTRY_DOMAIN, "client": client_id, "entry": index, "chain": link}
    return json.dumps(content, sort_keys=True, separators=(",", ":")).encode()


def _link(previous: str, record: dict[str, Any]) -> str:
    """Each entry's link hashes the previous link with the entry: deleting, reordering or
    editing one entry (or the budget) breaks every link after it. Tamper-evident against a
    partial edit only; a rewrite of the whole file recomputes the chain (the audit then checks
    the entries against the plan: records.audit)."""
    return hashlib.sha256((previous + json.dumps(record, sort_keys=True)).encode()).hexdigest()


@dataclass(frozen=True)
class PrivacyLedger:
    client_id: str
    budget: PrivacyBudget
    entries: tuple[LedgerEntry, ...] = field(default=())
    adjacency: str = ADJACENCY
    # One of NOISE_SOURCES; hashed into the first link, so relabelling it breaks the chain.
    noise_source: str = field(default=UNKNOWN_NOISE, kw_only=True)
    # The client's Ed25519 signature (hex) of each entry's statement (`entry_statement`), in
    # entry order; shorter than `entries`, or "", where an entry is unsigned (a ledger written
    # before signatures, or by a client without a signing key). Not part of the ledger's value:
    # `check` and `project` keep them, `signed` adds the missing ones.
    signatures: tuple[str, ...] = field(default=(), kw_only=True, compare=False)

    def __post_init__(self) -> None:
        if self.noise_source not in NOISE_SOURCES:
            raise PrivacyError(f"noise source must be one of {NOISE_SOURCES}, got {self.noise_source!r}")

    def composed_events(self, fallback: bool = False) -> list[dp_accounting.DpEvent]:
        """Every entry's event, identical ones folded into one self-composition (same privacy
        loss, and the accountant's cost no longer grows with the number of rounds)."""
        counts = Counter(
            (e.fallback_json or e.event_json) if fallback else e.event_json for e in self.entries
        )
        events = []
        for event_json, count in sorted(counts.items()):
            event = event_from_json(json.loads(event_json))
            events.append(event if count == 1 else dp_accounting.SelfComposedDpEvent(event, count))
        return events

    @cached_property
    def spent(self) -> float:
        """Epsilon spent at the budget's delta, by the PLD accountant: the primary figure, the
        one `check` holds to the budget."""
        return epsilon_pld(self.composed_events(), self.budget.delta) if self.entries else 0.0

    @cached_property
    def spent_rdp(self) -> float:
        """The same by the RDP accountant: an independent cross-check, never below `spent`. A
        plan calibrated on PLD reads above the budget here: RDP's looseness, not an overspend."""
        return epsilon_rdp(self.composed_events(), self.budget.delta) if self.entries else 0.0

    @property
    def split(self) -> bool:
        """Whether any release relied on noise split across clients."""
        return any(e.fallback_json is not None for e in self.entries)

    @cached_property
    def spent_fallback(self) -> float:
        """Epsilon against the server colluding with one client (PLD); equal to `spent` when no
        release split its noise."""
        if not self.split:
            return self.spent
        return epsilon_pld(self.composed_events(fallback=True), self.budget.delta)

    @property
    def remaining(self) -> float:
        return max(0.0, self.budget.epsilon - self.spent)

    def project(self, entries: Sequence[LedgerEntry]) -> PrivacyLedger:
        return replace(self, entries=(*self.entries, *entries))

    def check(self, entries: Sequence[LedgerEntry]) -> PrivacyLedger:
        """The ledger with `entries` added, or BudgetExceededError if it would exceed the budget."""
        projected = self.project(entries)
        if projected.spent > self.budget.epsilon * (1 + _RELATIVE_SLACK):
            names = ", ".join(str(e.event_id) for e in entries)
            raise BudgetExceededError(
                f"{self.client_id}: releasing {names} would spend epsilon {projected.spent:.4f} of a "
                f"budget of {self.budget.epsilon:g} (delta {self.budget.delta:g}); the round is refused "
                "and nothing was sent. Raise --epsilon, or plan fewer rounds."
            )
        return projected

    def links(self) -> list[str]:
        """Each entry's chain link, as `to_json` writes them."""
        budget = {"epsilon": self.budget.epsilon, "delta": self.budget.delta}
        link = _genesis(self.client_id, budget, self.adjacency, self.noise_source)
        links = []
        for e in self.entries:
            link = _link(link, {"round": e.round, "name": e.name} | e.parameters())
            links.append(link)
        return links

    def statements(self) -> list[bytes]:
        """What each entry's signature covers (`entry_statement`)."""
        return [entry_statement(self.client_id, i, link) for i, link in enumerate(self.links())]

    def signature(self, index: int) -> str:
        """Entry `index`'s signature; "" where it is unsigned."""
        return self.signatures[index] if index < len(self.signatures) else ""

    def signed(self, sign: Callable[[bytes], str]) -> PrivacyLedger:
        """This ledger with every unsigned entry signed by `sign` (a client's SigningKey.sign);
        the entries signed before keep their signatures."""
        statements = self.statements()
        signatures = tuple(self.signature(i) or sign(statements[i]) for i in range(len(self.entries)))
        return replace(self, signatures=signatures)

    def covers(self, event_id: EventId | str) -> bool:
        return any(e.event_id == _event_id(event_id) for e in self.entries)

    def declared(self, event_ids: Sequence[EventId | str]) -> dict[str, str]:
        """Each event's parameters as canonical JSON by its id's text, for a message's `events`:
        a release its ledger does not cover never leaves (the check is here as well as before
        the release)."""
        entries = {e.event_id: e for e in self.entries}
        wanted = sorted({_event_id(i) for i in event_ids}, key=str)
        missing = [str(i) for i in wanted if i not in entries]
        if missing:
            raise PrivacyError(
                f"{self.client_id}: no ledger entry covers {', '.join(missing)}; nothing was sent"
            )
        return {str(i): json.dumps(entries[i].parameters(), sort_keys=True) for i in wanted}

    def to_json(self) -> dict[str, Any]:
        budget = {"epsilon": self.budget.epsilon, "delta": self.budget.delta}
        link = _genesis(self.client_id, budget, self.adjacency, self.noise_source)
        entries = []
        for i, e in enumerate(self.entries):
            record = {"round": e.round, "name": e.name} | e.parameters()
            link = _link(link, record)
            signature = self.signature(i)
            entries.append(record | {"chain": link} | ({"signature": signature} if signature else {}))
        return {
            "client": self.client_id,
            "budget": budget,
            "adjacency": self.adjacency,
            "noise": self.noise_source,
            "entries": entries,
            # Derived figures, outside the chain (recomputed on load): the primary by
            # `accountant`, RDP as the cross-check. Ledgers written before PLD was primary hold
            # only "epsilon_rdp" and "epsilon_fallback_rdp"; their entries load the same.
            "accountant": str(PRIMARY),
            "epsilon": self.spent,
            "epsilon_fallback": self.spent_fallback,
            "epsilon_rdp": self.spent_rdp,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PrivacyLedger:
        try:
            budget = PrivacyBudget(float(data["budget"]["epsilon"]), float(data["budget"]["delta"]))
            entries = tuple(
                LedgerEntry(
                    int(e["round"]),
                    str(e["name"]),
                    json.dumps(e["event"], sort_keys=True),
                    json.dumps(e["fallback_event"], sort_keys=True) if "fallback_event" in e else None,
                )
                for e in data["entries"]
            )
            for entry in entries:
                entry.event_id  # noqa: B018 - a name or round no event id can hold fails now
            # A ledger written before the noise source was recorded loads as "unknown".
            noise = str(data["noise"]) if "noise" in data else None
            signatures = tuple(str(e.get("signature", "")) for e in data["entries"])
            ledger = cls(
                str(data["client"]),
                budget,
                entries,
                str(data["adjacency"]),
                noise_source=UNKNOWN_NOISE if noise is None else noise,
                signatures=signatures if any(signatures) else (),
            )
        except (KeyError, TypeError, ValueError, ProtocolViolation) as exc:
            raise PrivacyError(f"malformed ledger: {exc}") from exc
        for e in ledger.entries:
            e.event, e.fallback_event  # noqa: B018 - parse every event now, so a bad file fails on load
        link = _genesis(ledger.client_id, data["budget"], ledger.adjacency, noise)
        for i, record in enumerate(data["entries"]):
            link = _link(link, {k: v for k, v in record.items() if k not in _UNCHAINED})
            if record.get("chain") != link:
                raise PrivacyError(
                    f"ledger of {ledger.client_id}: entry {i} ({ledger.entries[i].event_id}) does not chain "
                    "to the entries before it: the file was edited after it was written"
                )
        return ledger

    def save(self, path: Path) -> None:
        """Write atomically: the file on disk is always a complete ledger (never through a link)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n"
        write_atomic(path, text.encode(), error=PrivacyError)

    @classmethod
    def load(cls, path: Path) -> PrivacyLedger:
        """A ledger file: a regular file (no FIFO, device or link) of at most LEDGER_FILE's cap."""
        data = read_json(Path(path), LEDGER_FILE, PrivacyError)
        if not isinstance(data, dict):
            raise PrivacyError(f"cannot read ledger {path}: it does not hold a ledger object")
        return cls.from_json(data)
