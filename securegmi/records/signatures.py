"""The audit's check of the clients' signatures: every message a client sent (as the server's
transcript records it) and every entry of every ledger, against the study's registry of the
clients' Ed25519 public keys.

Which registry: the one the auditor gives (`--signers`, the keys the study registered at its
key ceremony: a rewrite of the run directory cannot change it), else the copy the run directory
holds (signers.json), which whoever rewrote the directory could have replaced with keys of their
own, so the report says the signatures then show the records are self-consistent only. Either
way, a record that is unsigned or whose signature does not verify is a problem. A run directory
with neither signatures nor a registry was written before signatures: the report says it is
unsigned (a note, not a problem: nothing in it could be signed), and only an auditor's registry
turns a stripped-signature rewrite of a signed run into a failure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from securegmi.crypto.signing import SIGNING_KEY_SUFFIX, SignerRegistry
from securegmi.errors import CryptoError, RunDirectoryError
from securegmi.privacy.ledger import PrivacyLedger
from securegmi.protocol import SERVER
from securegmi.protocol.signed import row_statement
from securegmi.records.rundir import CLIENT_KEYS, LEDGERS, SIGNERS, TRANSCRIPT

GIVEN = "given"  # the auditor's registry
RECORDED = "run directory"  # the run directory's own signers.json
NONE = "none"  # no registry: an unsigned run


@dataclass(frozen=True)
class SignatureCheck:
    """What the signature check found: the registry it used (`source`, its `fingerprint`), how
    many message and ledger-entry signatures verify, its problems and its notes."""

    source: str
    fingerprint: str | None
    messages: int
    entries: int
    problems: tuple[str, ...]
    notes: tuple[str, ...]


def load_signers(path: Path) -> SignerRegistry:
    """The registry at `path` (an auditor's `--signers`), or `RunDirectoryError` saying why not."""
    try:
        return SignerRegistry.load(Path(path))
    except CryptoError as exc:
        raise RunDirectoryError(f"--signers {path}: not a registry of signing keys ({exc})") from None


def messages_of(rows: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """The transcript's rows of each message a client sent that the server took delivery of:
    consecutive rows of one message (same round, stage, link, run, status, bytes and signature),
    one per field. A row without a field (an error, which carries no release and whose text the
    server replaces by its allowed form before recording it) is not one."""
    groups: list[list[Mapping[str, Any]]] = []
    previous: tuple[Any, ...] | None = None
    for row in rows:
        if (
            row["sender"] == SERVER
            or row.get("status", "delivered") != "delivered"
            or row.get("field") is None
        ):
            previous = None
            continue
        key = tuple(
            row.get(k) for k in ("round", "stage", "sender", "receiver", "run", "message_sha256", "signature")
        )
        fields = {r.get("field") for r in groups[-1]} if groups and key == previous else None
        if fields is None or row.get("field") in fields:
            groups.append([row])
        else:
            groups[-1].append(row)
        previous = key
    return groups


def check_signatures(
    run_dir: Path,
    rows: Sequence[Mapping[str, Any]],
    ledgers: Mapping[str, PrivacyLedger],
    protocol: str,
    signers: SignerRegistry | None,
) -> SignatureCheck:
    """Every delivered client message and every ledger entry against `signers` (the auditor's)
    or, without it, the run directory's own registry."""
    problems: list[str] = []
    notes: list[str] = []
    recorded: SignerRegistry | None = None
    if (run_dir / SIGNERS).exists():
        try:
            recorded = SignerRegistry.load(run_dir / SIGNERS)
        except CryptoError as exc:
            problems.append(f"{SIGNERS} is unreadable ({exc}): the signatures cannot be checked against it")
    registry, source = (signers, GIVEN) if signers is not None else (recorded, RECORDED)
    if signers is not None and recorded is not None and recorded != signers:
        problems.append(
            f"{SIGNERS} in the run directory (fingerprint {recorded.fingerprint[:16]}) is not the registry "
            f"given (fingerprint {signers.fingerprint[:16]}): the directory's keys were replaced"
        )
    messages = messages_of(rows)
    signed = any(r.get("signature") for m in messages for r in m) or any(
        any(ledger.signatures) for ledger in ledgers.values()
    )
    if registry is None:
        if signed:
            problems.append(
                f"the records carry signatures, and the run directory holds no {SIGNERS}: pass --signers "
                "with the registry of signing keys the study registered"
            )
        else:
            notes.append(
                "unsigned run (written before signatures, or by clients without signing keys): nothing "
                "shows who wrote its records, so a consistent rewrite of every file is not caught; pass "
                "--signers with the study's registry to require signatures"
            )
        return SignatureCheck(NONE, None, 0, 0, tuple(problems), tuple(notes))
    if source == RECORDED:
        notes.append(
            f"signatures checked against the run directory's own {SIGNERS} (fingerprint "
            f"{registry.fingerprint}): they show the records are self-consistent, not who wrote them "
            "(whoever rewrote the directory could have replaced the keys); compare the fingerprint with "
            "the study's registration, or pass --signers"
        )
    if any((run_dir / CLIENT_KEYS).glob(f"*{SIGNING_KEY_SUFFIX}")):
        notes.append(
            f"the run directory holds the clients' signing keys ({CLIENT_KEYS}/: a simulation keeps every "
            "site's side here): the signatures show nothing against whoever holds this directory"
        )
    verified_messages = _check_messages(messages, registry, protocol, problems)
    verified_entries = _check_ledgers(ledgers, registry, problems)
    return SignatureCheck(
        source, registry.fingerprint, verified_messages, verified_entries, tuple(problems), tuple(notes)
    )


def _check_messages(
    messages: list[list[Mapping[str, Any]]], registry: SignerRegistry, protocol: str, problems: list[str]
) -> int:
    verified = 0
    failed: dict[str, list[str]] = {}
    for rows in messages:
        first = rows[0]
        client, signature = str(first["sender"]), first.get("signature", "")
        where = f"round {first['round']} ({first.get('stage')})"
        try:
            if any(r.get("signature", "") != signature for r in rows):
                raise CryptoError("its rows carry different signatures")
            registry.verify(client, row_statement(rows, protocol=protocol), str(signature or ""))
        except (CryptoError, KeyError, TypeError, ValueError) as exc:
            failed.setdefault(client, []).append(f"{where} [{exc}]")
            continue
        verified += 1
    for client, why in sorted(failed.items()):  # one line per client is enough to fail the audit
        more = f" (and {len(why) - 1} more of its messages)" if len(why) > 1 else ""
        problems.append(
            f"{client}: the {TRANSCRIPT} record of its message of {why[0]}{more} is not what the client "
            "signed"
        )
    return verified


def _check_ledgers(
    ledgers: Mapping[str, PrivacyLedger], registry: SignerRegistry, problems: list[str]
) -> int:
    verified = 0
    for client, ledger in sorted(ledgers.items()):
        bad = []
        for i, text in enumerate(ledger.statements()):
            try:
                registry.verify(client, text, ledger.signature(i))
            except CryptoError as exc:
                bad.append(f"entry {i} ({ledger.entries[i].event_id}) [{exc}]")
                continue
            verified += 1
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            problems.append(f"{client}: {LEDGERS}/{client}.json {bad[0]}{more} is not what the client signed")
    return verified
