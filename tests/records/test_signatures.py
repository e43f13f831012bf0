"""Signed records (issue 27, item 5): each client signs every message it sends and every ledger
entry it writes; the server refuses a reply its client's registered key did not sign; the audit
verifies every signature against the registry (the auditor's `--signers`, or the run
directory's own copy, which shows the records self-consistent only).

The forgery every test here starts from is one the audit passed before signatures: a private
run relabelled ten times more private, consistently, in its configuration, plan, ledgers (hash
chains recomputed), the ledger copies in the clients' states and the transcript."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from securegmi.cli.main import app
from securegmi.crypto.signing import SignerRegistry, SigningKey
from securegmi.errors import ConfigError, CryptoError, ProtocolViolation, SignatureError
from securegmi.federation.transport import InProcessTransport
from securegmi.privacy import ledger as ledger_module
from securegmi.privacy.calibration import plan_from_dict
from securegmi.privacy.ledger import PrivacyBudget, PrivacyLedger
from securegmi.protocol import SERVER, DpRelease, Message, Public, TranscriptWriter, decode, encode
from securegmi.protocol.signed import message_statement, row_statement, sign_message, verify_message
from securegmi.simulation.runner import run_simulation
from securegmi.simulation.study import Federation
from tests.configs import private_config, small_config
from tests.forgery import rechain
from tests.secret_walk import secret_holders

runner = CliRunner()
FACTOR = 10.0  # how much more noise the forgery claims


@pytest.fixture(scope="module")
def signed_run(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A private run, and a copy of the registry the study registered, kept outside it."""
    base = tmp_path_factory.mktemp("signed")
    out = base / "run"
    run_simulation(private_config(epsilon=2.0), out=out)
    registered = base / "registered-signers.json"
    shutil.copyfile(out / "signers.json", registered)
    return out, registered


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def _inflate(tree: Any) -> None:
    """Every noise multiplier of a JSON tree (a plan's, an event's) multiplied by FACTOR."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if isinstance(value, float) and key.endswith(("noise", "noise_multiplier")):
                tree[key] = value * FACTOR
            else:
                _inflate(value)
    elif isinstance(tree, list):
        for item in tree:
            _inflate(item)


def forge(run_dir: Path, forger: dict[str, SigningKey] | None = None) -> float:
    """The consistent forgery: every noise multiplier FACTOR times what it was and the budget
    the plan then spends, in config.json, dp_plan.json, every ledger, every client state's copy
    of its ledger and every transcript row; with `forger` (keys of the forger's own) every
    record re-signed and signers.json replaced by the forger's registry. The claimed epsilon."""
    plan = json.loads((run_dir / "dp_plan.json").read_text())
    _inflate(plan)
    claimed = plan_from_dict(plan | {"epsilon": 1.0}).planned_epsilon()
    plan["epsilon"] = claimed
    (run_dir / "dp_plan.json").write_text(json.dumps(plan))
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps(config | {"epsilon": claimed}))
    for path in sorted((run_dir / "ledgers").glob("*.json")):
        data = json.loads(path.read_text())
        _inflate(data["entries"])
        data["budget"]["epsilon"] = claimed
        rechain(data)
        path.write_text(json.dumps(data))
        ledger = PrivacyLedger.load(path)
        if forger is not None:
            ledger = ledger.signed(forger[ledger.client_id].sign)
            ledger.save(path)
        state = run_dir / "client-states" / f"{path.stem}.safetensors"
        with safe_open(str(state), framework="numpy") as fh:
            metadata = dict(fh.metadata() or {})
        metadata["ledger"] = json.dumps(ledger.to_json(), sort_keys=True)
        save_file(load_file(str(state)), str(state), metadata=metadata)
    rows = _rows(run_dir / "transcript.jsonl")
    for row in rows:
        if "dp_event" in row:
            _inflate(row["dp_event"])
    if forger is not None:
        _resign(rows, forger, json.loads((run_dir / "protocol.json").read_text())["name"])
        SignerRegistry.of(forger).save(run_dir / "signers.json")
    _write_rows(run_dir / "transcript.jsonl", rows)
    return claimed


def _resign(rows: list[dict[str, Any]], keys: dict[str, SigningKey], protocol: str) -> None:
    """Every client message's rows signed anew with `keys`, as the audit rebuilds them."""
    from securegmi.records.signatures import messages_of

    for message in messages_of(rows):
        signature = keys[message[0]["sender"]].sign(row_statement(message, protocol=protocol))
        for row in message:
            row["signature"] = signature  # type: ignore[index]


def _strip_signatures(run_dir: Path) -> None:
    """The run directory as one written before signatures: no signature, no registry."""
    rows = [{k: v for k, v in r.items() if k != "signature"} for r in _rows(run_dir / "transcript.jsonl")]
    _write_rows(run_dir / "transcript.jsonl", rows)
    for path in sorted((run_dir / "ledgers").glob("*.json")):
        data = json.loads(path.read_text())
        for record in data["entries"]:
            record.pop("signature", None)
        path.write_text(json.dumps(data))
    (run_dir / "signers.json").unlink()


def _audit(run_dir: Path, *options: str) -> tuple[int, dict[str, Any]]:
    result = runner.invoke(app, ["audit", str(run_dir), *options, "--json"])
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


def _signature_problems(report: dict[str, Any]) -> list[str]:
    n = report["signature_problems"]
    return list(report["problems"][len(report["problems"]) - n :]) if n else []


# --- the honest run ---------------------------------------------------------------------------


@pytest.mark.slow
def test_an_honest_run_verifies_every_signature(signed_run):
    out, registered = signed_run
    rows = _rows(out / "transcript.jsonl")
    uplink = [r for r in rows if r["sender"] != SERVER]
    assert uplink and all(r.get("signature") for r in uplink)
    assert not any("signature" in r for r in rows if r["sender"] == SERVER)  # the server holds no key
    entries = sum(len(json.loads(p.read_text())["entries"]) for p in (out / "ledgers").glob("*.json"))
    for options in ((), ("--signers", str(registered))):
        code, report = _audit(out, *options)
        assert code == 0 and report["problems"] == [], report["problems"]
        assert report["signed_entries"] == entries and report["signed_messages"] > 0
        assert report["signers"] == ("given" if options else "run directory")
        assert report["signers_fingerprint"] == SignerRegistry.load(registered).fingerprint
    text = runner.invoke(app, ["audit", str(out)]).output
    assert "every signature verifies" in text and "self-consistent" in text
    given = runner.invoke(app, ["audit", str(out), "--signers", str(registered)]).output
    assert "every signature verifies" in given and "self-consistent" not in given


# --- the consistent forgery -------------------------------------------------------------------


@pytest.mark.slow
def test_the_consistent_forgery_passes_an_unsigned_run_and_fails_a_signed_one(signed_run, tmp_path):
    """Negative control first: the forgery of the run as written before signatures passes
    (it is what the audit passed before), noted as unsigned. Signed, it fails on every
    client's ledger and messages, against the run directory's registry and against the
    auditor's alike; every other check still passes it."""
    out, registered = signed_run
    unsigned = _copy(out, tmp_path / "unsigned")
    _strip_signatures(unsigned)
    claimed = forge(unsigned)
    assert claimed < 2.0 / 5  # the run spent 2.0 and claims a fifth of it or less
    code, report = _audit(unsigned)
    assert code == 0 and report["problems"] == [] and report["signers"] == "none", report["problems"]
    assert any(n.startswith("unsigned run") for n in report["notes"])
    assert max(b["epsilon"] for b in report["budgets"]) <= claimed * (1 + 1e-6)

    signed = _copy(out, tmp_path / "signed")
    forge(signed)
    clients = sorted(p.stem for p in (signed / "ledgers").glob("*.json"))
    for options in ((), ("--signers", str(registered))):
        code, report = _audit(signed, *options)
        found = _signature_problems(report)
        assert code == 1 and found == report["problems"], report["problems"]  # only the signatures
        ledgers = [p for p in found if "ledgers/" in p]
        messages = [p for p in found if "transcript.jsonl" in p]
        assert [p.split(":")[0] for p in ledgers] == clients and all("no signature" in p for p in ledgers)
        assert [p.split(":")[0] for p in messages] == clients
        assert all("does not verify" in p for p in messages), messages


@pytest.mark.slow
def test_a_forgery_resigned_under_the_forgers_own_registry_fails_only_against_the_registered_one(
    signed_run, tmp_path
):
    """The forger replaces signers.json with keys of their own and re-signs every record: the
    run directory is then self-consistent, and the audit without --signers says only that (its
    fingerprint is not the study's). Against the registered keys it fails."""
    out, registered = signed_run
    forged = _copy(out, tmp_path / "forged")
    forger = {cid: SigningKey.generate(cid) for cid in SignerRegistry.load(out / "signers.json")}
    forge(forged, forger)
    code, report = _audit(forged)
    assert code == 0 and report["problems"] == [], report["problems"]
    assert report["signers"] == "run directory"
    assert report["signers_fingerprint"] != SignerRegistry.load(registered).fingerprint
    assert any("self-consistent" in n for n in report["notes"])
    code, report = _audit(forged, "--signers", str(registered))
    found = _signature_problems(report)
    assert code == 1 and found == report["problems"]
    assert found[0].startswith("signers.json in the run directory") and "replaced" in found[0]
    assert len(found) == 1 + 2 * 3  # the registry, then each client's ledger and messages
    # The registry the auditor holds is what decides: the forger's own passes (control).
    mine = tmp_path / "forger-signers.json"
    SignerRegistry.of(forger).save(mine)
    assert _audit(forged, "--signers", str(mine))[0] == 0


@pytest.mark.slow
def test_a_stripped_signature_fails_and_an_unsigned_run_fails_against_a_registry(signed_run, tmp_path):
    """Downgrades: one row's signature removed from a signed run fails; every signature and the
    registry removed reads as a run written before signatures (a note), which the auditor's
    registry turns into a failure."""
    out, registered = signed_run
    one = _copy(out, tmp_path / "one")
    rows = _rows(one / "transcript.jsonl")
    target = next(r for r in rows if r["sender"] == "client-2")
    for row in rows:
        if row["sender"] == "client-2" and row["round"] == target["round"]:
            row.pop("signature")
    _write_rows(one / "transcript.jsonl", rows)
    code, report = _audit(one)
    assert code == 1 and report["problems"] == _signature_problems(report)
    assert len(report["problems"]) == 1 and report["problems"][0].startswith("client-2: the transcript.jsonl")
    assert "no signature" in report["problems"][0]

    stripped = _copy(out, tmp_path / "stripped")
    _strip_signatures(stripped)
    code, report = _audit(stripped)
    assert code == 0 and any(n.startswith("unsigned run") for n in report["notes"])
    code, report = _audit(stripped, "--signers", str(registered))
    assert code == 1 and len(_signature_problems(report)) == 6, report["problems"]


def _flip(value: str) -> str:
    return value[:5] + ("0" if value[5] != "0" else "1") + value[6:]


@pytest.mark.slow
@pytest.mark.parametrize("what", ["signature", "sha256", "round", "run"])
def test_a_tampered_signature_or_row_or_a_message_moved_to_another_round_fails_the_audit(
    signed_run, tmp_path, what
):
    """One client message's recorded signature or one field's digest with one character
    changed, or the message's rows moved to another round or run id (a replay written into the
    record), no longer verifies; the untouched copy passes (control)."""
    out, _ = signed_run
    copy = _copy(out, tmp_path / what)
    rows = _rows(copy / "transcript.jsonl")
    target = next(r for r in rows if r["sender"] == "client-1" and r.get("field") is not None)
    assert _audit(copy)[0] == 0  # control
    same_message = [r for r in rows if r.get("signature") == target["signature"]]
    for row in same_message if what != "sha256" else [target]:
        if what == "round":
            row["round"] += 1
        else:
            row[what] = _flip(row[what])
    _write_rows(copy / "transcript.jsonl", rows)
    code, report = _audit(copy)
    problems = _signature_problems(report)
    assert code == 1 and [p.split(":")[0] for p in problems] == ["client-1"], report["problems"]
    assert "is not what the client signed" in problems[0]


# --- messages: what a signature binds ---------------------------------------------------------


def _message(**changes: Any) -> Message:
    fields = {
        "masses": DpRelease(np.array([1.0, 2.0]), "counts@round3"),
        "temperature": Public(np.asarray(1.0)),
    }
    event = json.dumps({"event": {"noise_multiplier": 2.0, "type": "gaussian"}}, sort_keys=True)
    base: dict[str, Any] = {
        "stage": "update",
        "round": 3,
        "sender": "client-0",
        "payload": fields,
        "run": "run-a",
        "events": {"counts@round3": event},
    }
    return Message(**(base | changes))


def test_a_signed_message_verifies_and_a_replayed_or_altered_one_does_not():
    keys = {cid: SigningKey.generate(cid) for cid in ("client-0", "client-1")}
    registry = SignerRegistry.of(keys)
    signed = sign_message(_message(), keys["client-0"], protocol="dp")
    verify_message(signed, registry, "client-0", protocol="dp")  # control
    verify_message(decode(encode(signed)), registry, "client-0", protocol="dp")  # the wire keeps it
    event = json.dumps({"event": {"noise_multiplier": 20.0, "type": "gaussian"}}, sort_keys=True)
    replays = {
        "another round": dataclasses.replace(signed, round=4),
        "another stage": dataclasses.replace(signed, stage="gradient"),
        "another run": dataclasses.replace(signed, run="run-b"),
        "another payload": dataclasses.replace(
            signed, payload={**signed.payload, "masses": DpRelease(np.array([1.0, 2.5]), "counts@round3")}
        ),
        "another event": dataclasses.replace(signed, events={"counts@round3": event}),
        "a flipped signature": dataclasses.replace(
            signed, signature=("0" if signed.signature[0] != "0" else "1") + signed.signature[1:]
        ),
        "no signature": dataclasses.replace(signed, signature=""),
    }
    for why, message in replays.items():
        with pytest.raises(SignatureError, match="refused"):
            verify_message(message, registry, "client-0", protocol="dp")
        assert why
    with pytest.raises(SignatureError):  # another protocol
        verify_message(signed, registry, "client-0", protocol="secure")
    with pytest.raises(SignatureError):  # on another client's link
        verify_message(signed, registry, "client-1", protocol="dp")
    with pytest.raises(SignatureError, match="not a registered signer"):
        verify_message(signed, SignerRegistry.of({"client-1": keys["client-1"]}), "client-0", protocol="dp")
    with pytest.raises(CryptoError):  # a key signs only its own client's messages
        sign_message(_message(), keys["client-1"], protocol="dp")
    assert isinstance(SignatureError("x"), ProtocolViolation) and isinstance(SignatureError("x"), CryptoError)


def test_the_transcript_rows_of_a_message_rebuild_the_statement_it_signed(tmp_path):
    """What the audit checks against is what the client signed: the statement rebuilt from the
    rows the server records equals the message's own (control: another receiver's differs)."""
    message = sign_message(_message(), SigningKey.generate("client-0"), protocol="dp")
    writer = TranscriptWriter(tmp_path / "t.jsonl")
    writer.record(message, encode(message), receiver=SERVER)
    writer.close()
    rows = _rows(tmp_path / "t.jsonl")
    assert len(rows) == 2 and {r["signature"] for r in rows} == {message.signature}
    assert row_statement(rows, protocol="dp") == message_statement(message, protocol="dp")
    assert row_statement(rows, protocol="dp") != message_statement(
        message, protocol="dp", receiver="client-1"
    )


# --- the server refuses what its client did not sign -----------------------------------------


class _Resigning(InProcessTransport):
    """Carries each reply re-signed with `key` (a client's id on another client's key)."""

    key: SigningKey | None = None

    def deliver(self, client_id: str, wire: bytes) -> bytes:
        reply = super().deliver(client_id, wire)
        if self.key is None:
            return reply
        message = dataclasses.replace(decode(reply), signature="")
        return encode(sign_message(message, self.key, protocol=self.server.spec.name))


def test_the_server_refuses_a_reply_signed_with_another_clients_key(tmp_path):
    config = small_config(clients=2, rounds=1)
    federation = Federation.build(config)
    keys = {cid: SigningKey.generate(cid) for cid in federation.client_ids}
    clients = [
        federation.client(i, None, signing_key=keys[cid]) for i, cid in enumerate(federation.client_ids)
    ]
    server = federation.server(None, tmp_path / "transcript.jsonl", SignerRegistry.of(keys))
    transport = _Resigning(server.endpoint, {c.client_id: c.endpoint for c in clients})
    # client-0's id, signed with client-1's private key: the server refuses it, recorded.
    transport.key = SigningKey("client-0", keys["client-1"]._private)
    exchange = transport.exchange({"client-0": server.broadcast(0, 1.0)})
    assert (
        exchange.replies == {}
        and "does not verify against client-0's registered key" in exchange.refused["client-0"]
    )
    statuses = [r["status"] for r in _rows(tmp_path / "transcript.jsonl") if r["sender"] == "client-0"]
    assert "rejected" in statuses and statuses[-1] == "refused"
    # Control: the same reply signed with its own key is accepted.
    transport.key = None
    exchange = transport.exchange({"client-0": server.broadcast(0, 1.0)})
    assert list(exchange.replies) == ["client-0"] and exchange.refused == {}
    # An unsigned reply is refused by a server with a registry, and taken by one without.
    unsigned = federation.client(1, None)
    wire = unsigned.receive(server.send("client-1", server.broadcast(0, 1.0)))
    with pytest.raises(SignatureError, match="no signature"):
        server.accept("client-1", wire)
    assert federation.server(None).accept("client-1", wire).sender == "client-1"
    # The server holds the registry (public keys) and no signing key; the client holds its own.
    assert secret_holders(server) == []
    assert any("SigningKey" in path for path in secret_holders(clients[0]))  # control
    server.close()
    with pytest.raises(ConfigError, match="signs with its own"):
        federation.client(0, None, signing_key=keys["client-1"])


# --- the keys: client side only ----------------------------------------------------------------


@pytest.mark.slow
def test_no_signing_key_is_in_any_server_side_file(signed_run):
    """The clients' private keys are in client-keys/ only (mode 0600), never in the transcript,
    the server's state, the registry, the ledgers, the results or any other record."""
    out, _ = signed_run
    keys = sorted((out / "client-keys").glob("*.ed25519"))
    assert len(keys) == 3 and all(k.stat().st_mode & 0o077 == 0 for k in keys)
    secrets = [bytes.fromhex(k.read_text().strip()) for k in keys]
    patterns = [p for s in secrets for p in (s, s.hex().encode(), s.hex().upper().encode())]
    # Control: the scan finds each key in its own file.
    assert all(any(p in k.read_bytes() for p in patterns) for k in keys)
    server_side = [p for p in out.rglob("*") if p.is_file() and "client-keys" not in p.parts]
    assert {p.name for p in server_side} >= {"transcript.jsonl", "signers.json", "server-state.safetensors"}
    found = [str(p.relative_to(out)) for p in server_side if any(s in p.read_bytes() for s in patterns)]
    assert found == []
    assert repr(SigningKey.load(out / "client-keys", "client-0")).count(secrets[0].hex()) == 0


def test_a_signing_key_readable_by_others_or_not_a_key_is_refused(tmp_path):
    key = SigningKey.generate("client-0")
    path = key.save(tmp_path)
    assert SigningKey.load(tmp_path, "client-0").public_bytes == key.public_bytes  # control
    with pytest.raises(CryptoError, match="refusing to overwrite"):
        key.save(tmp_path)
    path.chmod(0o644)
    with pytest.raises(CryptoError, match="readable by others"):
        SigningKey.load(tmp_path, "client-0")
    path.chmod(0o600)
    path.write_text("not a key")
    with pytest.raises(CryptoError, match="not an Ed25519 signing key"):
        SigningKey.load(tmp_path, "client-0")


def test_a_registry_round_trips_and_its_fingerprint_names_its_keys(tmp_path):
    keys = {cid: SigningKey.generate(cid) for cid in ("a", "b")}
    registry = SignerRegistry.of(keys)
    registry.save(tmp_path / "signers.json")
    loaded = SignerRegistry.load(tmp_path / "signers.json")
    assert loaded == registry and loaded.fingerprint == registry.fingerprint
    other = SignerRegistry.of(keys | {"b": SigningKey.generate("b")})
    assert other.fingerprint != registry.fingerprint  # control
    with pytest.raises(CryptoError):
        SignerRegistry.from_json({"algorithm": "ed25519", "signers": {"a": "00"}})


# --- ledgers ------------------------------------------------------------------------------------


def _ledger() -> PrivacyLedger:
    event = dp_accounting.GaussianDpEvent(2.0)
    entries = tuple(ledger_module.LedgerEntry.of(r, "counts", event) for r in range(3))
    return PrivacyLedger("client-0", PrivacyBudget(8.0, 1e-5), entries, noise_source="private")


def test_a_signed_ledger_round_trips_and_each_entry_signs_its_chain_link():
    key = SigningKey.generate("client-0")
    registry = SignerRegistry.of({"client-0": key})
    ledger = _ledger().signed(key.sign)
    loaded = PrivacyLedger.from_json(json.loads(json.dumps(ledger.to_json())))
    assert loaded.signatures == ledger.signatures and len(loaded.signatures) == 3
    for i, text in enumerate(loaded.statements()):
        registry.verify("client-0", text, loaded.signature(i))  # control
    # An entry's signature covers every entry before it: an earlier entry edited (its chain
    # recomputed) leaves every later signature unverified.
    data = ledger.to_json()
    data["entries"][0]["event"]["noise_multiplier"] = 20.0
    for record in data["entries"]:
        record.pop("chain")
    link = ledger_module._genesis(data["client"], data["budget"], data["adjacency"], data["noise"])
    for record in data["entries"]:
        link = ledger_module._link(link, {k: v for k, v in record.items() if k != "signature"})
        record["chain"] = link
    edited = PrivacyLedger.from_json(data)
    verified = [registry.valid("client-0", t, edited.signature(i)) for i, t in enumerate(edited.statements())]
    assert verified == [False, False, False]
    # Signing again keeps what was signed and signs only what is new.
    grown = ledger.project([ledger_module.LedgerEntry.of(3, "counts", ledger.entries[0].event)])
    assert grown.signature(3) == "" and grown.signed(key.sign).signatures[:3] == ledger.signatures
    # An unsigned ledger (older file) loads and says so.
    assert PrivacyLedger.from_json(_ledger().to_json()).signatures == ()
