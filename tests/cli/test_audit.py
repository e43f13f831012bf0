from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from securegmi.cli.main import app
from securegmi.privacy import ledger as ledger_module
from securegmi.records.rundir import CLIENT_STATES, ENGINE, METRICS, SERVER_STATE
from securegmi.simulation.runner import run_simulation
from tests.configs import private_config, small_config
from tests.forgery import rechain

runner = CliRunner()


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "dp"
    # --rounds sets the EM designs' length only; the statistics design's is its own.
    config = private_config(epsilon=2.0)
    result = run_simulation(config, out=out)
    return out, result


@pytest.fixture(scope="module")
def em_run(tmp_path_factory):
    """The em design (soft counts every round): its protocol has no per-client histogram, so
    protocol.json says nothing of the number of clients."""
    out = tmp_path_factory.mktemp("audit") / "em"
    config = private_config(epsilon=2.0, private_training="em", rounds=2)
    run_simulation(config, out=out)
    return out


@pytest.mark.slow
def test_a_dp_run_passes_the_audit(dp_run):
    out, result = dp_run
    assert result.privacy is not None
    assert result.privacy["max_spent"] <= 2.0 * (1 + 1e-6)
    # PLD is held to the budget; RDP, the cross-check, is looser (above the budget: not an overspend).
    assert result.privacy["accountant"] == "pld"
    assert result.privacy["max_spent"] <= 2.0 * (1 + 1e-6) < result.privacy["max_spent_rdp"]
    assert result.privacy["secure_rng"] is True  # ChaCha20 keyed from OS entropy
    results = json.loads((out / "results.json").read_text())
    assert results["epsilon"]["target"] == 2.0 and results["protocol"] == "dp"
    audit = runner.invoke(app, ["audit", str(out)])
    assert audit.exit_code == 0, audit.output
    assert "audit passed" in audit.output
    report = json.loads(runner.invoke(app, ["audit", str(out), "--json"]).stdout)
    assert report["ok"] and {d["protection"] for d in report["disclosures"]} == {"dp"}
    assert len(report["budgets"]) == 3


def _rewrite(path: Path, change: Callable[[dict[str, Any]], None], *, consistently: bool) -> None:
    """Edit a ledger file; `consistently` also recomputes its hash chain, as someone who knows
    the format would, dropping the client's signatures (which nobody without its key can make
    anew)."""
    data = json.loads(path.read_text())
    change(data)
    if consistently:
        rechain(data)
    path.write_text(json.dumps(data))


def _problems(run_dir: Path, *, signatures: bool = False) -> list[str]:
    """The audit's problems; without `signatures`, those of every check but the signatures'
    (listed last): each edit below is also caught by the records the edit left alone, which is
    what still catches a forger who holds the clients' signing keys (a simulation's directory
    keeps them in client-keys/). tests/records/test_signatures.py tests the signatures."""
    audit = runner.invoke(app, ["audit", str(run_dir), "--json"])
    assert audit.exit_code == 1, audit.output
    report = json.loads(audit.stdout)
    problems = list(report["problems"])
    return problems if signatures else problems[: len(problems) - report["signature_problems"]]


def _forget_round_1(ledger: dict[str, Any]) -> None:
    ledger["entries"] = [e for e in ledger["entries"] if e["round"] != 1]


@pytest.mark.slow
def test_an_uncovered_release_fails_the_audit(dp_run, tmp_path):
    out, _ = dp_run
    for consistently in (False, True):
        tampered = tmp_path / f"tampered-{consistently}"
        _copy(out, tampered)
        _rewrite(tampered / "ledgers" / "client-1.json", _forget_round_1, consistently=consistently)
        problems = _problems(tampered)
        # An edit alone breaks the chain; a rewrite leaves round 1's release uncovered.
        assert any(p.startswith("client-1") and "does not chain" in p for p in problems) != consistently
        assert any(p.startswith("client-1") and "clusters@round1" in p for p in problems)


def _inflate(tree: object, factor: float) -> None:
    """Multiply every noise multiplier in a JSON tree by `factor`, in place."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key == "noise_multiplier":
                tree[key] = value * factor
            else:
                _inflate(value, factor)
    elif isinstance(tree, list):
        for item in tree:
            _inflate(item, factor)


@pytest.mark.slow
def test_a_ledger_whose_noise_was_inflated_fails_the_audit_naming_the_client(dp_run, tmp_path):
    """Inflating one ledger's noise multipliers 10x would understate its epsilon (1.78 for 8
    once). Edited alone, the hash chain breaks; rewritten consistently, the entries disagree
    with dp_plan.json; with the plan inflated too, the plan no longer spends its budget."""
    out, _ = dp_run
    tampered = tmp_path / "inflated"
    _copy(out, tampered)
    ledger_file = tampered / "ledgers" / "client-2.json"
    original = ledger_file.read_text()
    _rewrite(ledger_file, lambda d: _inflate(d["entries"], 10.0), consistently=False)
    problems = _problems(tampered)  # the chain, and so every release of client-2 is uncovered
    assert problems[0].startswith("client-2: ") and "ledger of client-2: entry 0" in problems[0]
    assert "does not chain" in problems[0]
    assert all(p.startswith("client-2") for p in problems)
    ledger_file.write_text(original)
    _rewrite(ledger_file, lambda d: _inflate(d["entries"], 10.0), consistently=True)
    against_plan, against_state, against_transcript, understated = _problems(tampered)
    assert against_plan.startswith("client-2: ledger entry") and "the plan decided" in against_plan
    assert (
        against_transcript.startswith("client-2: the server received")
        and "ledger records" in against_transcript
    )
    assert understated.startswith("client-2: the releases the server received spend epsilon 2.0000")
    # client-2's state holds the copy of its ledger it saved with its last reply, as written.
    assert against_state.startswith("client-2: client-states/client-2.safetensors, saved with its reply")
    assert against_state.endswith("otherwise: the ledger file was edited after the client wrote it")
    plan_file = tampered / "dp_plan.json"
    plan = json.loads(plan_file.read_text())
    _inflate(plan, 10.0)
    plan["sgd_noise_multiplier"] *= 10.0
    plan_file.write_text(json.dumps(plan))
    problems = _problems(tampered)
    assert any("not the plan securegmi calibrates" in p for p in problems)
    # Ledger and plan rewritten together: the server's record of what arrived still disagrees.
    assert any(p.startswith("client-2: the server received") for p in problems)


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_the_transcript_records_each_release_as_received_and_the_audit_recomputes_it(dp_run, tmp_path):
    out, _ = dp_run
    rows = _rows(out / "transcript.jsonl")
    released = [r for r in rows if r.get("kind") == "dp-release" and r["sender"] != "server"]
    assert released and all("noise_multiplier" in json.dumps(r["dp_event"]) for r in released)
    ledger = json.loads((out / "ledgers" / "client-0.json").read_text())
    recorded = {f"{e['name']}@round{e['round']}": e["event"] for e in ledger["entries"]}
    for row in released:
        if row["sender"] == "client-0":
            assert row["dp_event"]["event"] == recorded[row["event"]]
    report = json.loads(runner.invoke(app, ["audit", str(out), "--json"]).stdout)
    for budget in report["budgets"]:
        assert budget["epsilon_transcript"] == pytest.approx(budget["epsilon"], rel=1e-9)

    # Negative controls: the transcript edited alone (one release's noise inflated 10x, or its
    # event removed) disagrees with the client's ledger.
    for name, edit in (
        ("inflated", lambda row: _inflate(row["dp_event"], 10.0)),
        ("stripped", lambda row: row.pop("dp_event")),
    ):
        tampered = tmp_path / name
        _copy(out, tampered)
        edited = _rows(tampered / "transcript.jsonl")
        target = next(r for r in edited if r.get("dp_event") and r["sender"] == "client-1")
        edit(target)
        (tampered / "transcript.jsonl").write_text("".join(json.dumps(r) + "\n" for r in edited))
        (problem,) = _problems(tampered)
        expected = "the server received" if name == "inflated" else "the transcript's record of its release"
        assert problem.startswith(f"client-1: {expected} {target['event']}"), problem


@pytest.mark.slow
def test_an_exceeded_budget_fails_the_audit(dp_run, tmp_path):
    out, _ = dp_run
    tampered = tmp_path / "over"
    _copy(out, tampered)

    def lower_budget(ledger: dict[str, Any]) -> None:
        ledger["budget"]["epsilon"] = 0.5

    _rewrite(tampered / "ledgers" / "client-0.json", lower_budget, consistently=True)
    problems = _problems(tampered)
    assert any("exceeds its budget" in p for p in problems)
    assert any(p.startswith("client-0: the ledger's budget") for p in problems)


@pytest.mark.slow
def test_a_plain_run_fails_the_audit(tmp_path):
    run_simulation(small_config(rounds=2), out=tmp_path / "plain")
    audit = runner.invoke(app, ["audit", str(tmp_path / "plain")])
    assert audit.exit_code == 1
    assert "without protection" in audit.output


def test_audit_of_a_missing_run_is_a_clear_error(tmp_path):
    audit = runner.invoke(app, ["audit", str(tmp_path / "nothing")])
    assert audit.exit_code == 2 and "not the run directory" in audit.output


def _copy(src, dst):  # type: ignore[no-untyped-def]
    import shutil

    shutil.copytree(src, dst)


@pytest.mark.slow
def test_report_of_a_private_run_draws_privacy_per_round(dp_run):
    out, _ = dp_run
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "privacy.png").stat().st_size > 1000
    # synthetic records are not square images: no sample grid, and no error for it
    assert not (out / "samples.png").exists()


# --- An audit that counts (issue 25): each partial edit below passed the audit before ----------


def _passes(run_dir: Path) -> None:
    audit = runner.invoke(app, ["audit", str(run_dir), "--json"])
    assert audit.exit_code == 0, audit.output


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _ledger_epsilon(path: Path) -> float:
    return ledger_module.PrivacyLedger.load(path).spent


def _added(r: int, saved: int, recorded: int, none_from: str | None = None) -> str:
    """The problem of a round whose replies the transcript records other than the server's state."""
    also = "" if none_from is None else f", none from {none_from}"
    return (
        f"round {r}: server-state.safetensors says the server's sums of that round add {saved} client "
        f"uploads, the transcript records {recorded} added{also}: the transcript is not the server's "
        "record of that round"
    )


def _counted(r: int, where: str, counted: str, recorded: str) -> str:
    """The problem of a round whose refusals the transcript records other than `where` counts them."""
    also = "the transcript is not the run's record of that round"
    return f"round {r}: {where} {counted}, the transcript {recorded}: {also}"


def _lacks(client: str, r: int, cut: list[str]) -> str:
    """The problem of a ledger file without releases its client's state says it committed."""
    return (
        f"{client}: client-states/{client}.safetensors, saved with its reply to round {r}, holds a copy of "
        f"its ledger, and ledgers/{client}.json lacks {', '.join(cut)}: the ledger file was edited after "
        "the client wrote it"
    )


@pytest.mark.slow
@pytest.mark.parametrize("with_the_servers_message", [False, True])
def test_a_ledger_cut_at_its_tail_with_its_transcript_rows_fails_the_audit(
    dp_run, tmp_path, with_the_servers_message
):
    """A hash chain's prefix still verifies: cutting client-1's last round from its ledger and
    its reply (and the server's message to it, or not) from the transcript understated its
    epsilon. The plan says every completed round's entries; the transcript says whether client-1
    dropped out of that round (a refusal), and it does not."""
    out, _ = dp_run
    tampered = tmp_path / "cut"
    _copy(out, tampered)
    _passes(tampered)  # negative control: the unedited run
    ledger_file = tampered / "ledgers" / "client-1.json"
    spent = _ledger_epsilon(ledger_file)
    data = json.loads(ledger_file.read_text())
    last = max(e["round"] for e in data["entries"])
    cut = [e for e in data["entries"] if e["round"] == last]
    data["entries"] = data["entries"][: -len(cut)]  # no chain recomputed: the prefix verifies
    ledger_file.write_text(json.dumps(data))
    assert _ledger_epsilon(ledger_file) < spent  # the edit understates what client-1 spent
    parties = ("sender", "receiver") if with_the_servers_message else ("sender",)
    rows = _rows(tampered / "transcript.jsonl")
    kept = [r for r in rows if not (r["round"] == last and "client-1" in (r[p] for p in parties))]
    assert len(kept) < len(rows)
    _write_rows(tampered / "transcript.jsonl", kept)
    names = ", ".join(f"{e['name']}@round{last}" for e in cut)
    assert _problems(tampered) == [
        f"client-1: its ledger holds {len(data['entries'])} entries and lacks {names} of the {last + 1} "
        "rounds the run completed, where the transcript records no refusal of it",
        f"client-1: the transcript records no message to it in round {last}"
        if with_the_servers_message
        else f"client-1: the transcript records neither its reply nor a refusal in round {last}",
        # The server's saved state and client-1's own state, untouched, say otherwise.
        _added(last, 3, 2, None if with_the_servers_message else "client-1"),
        _lacks("client-1", last, [f"{e['name']}@round{last}" for e in cut]),
    ]


def _forge_a_refusal(run_dir: Path, client: str) -> tuple[int, list[str]]:
    """Cut `client`'s last round from its ledger (a prefix of the chain: it still verifies) and
    put one refusal row in place of its reply in the transcript, as the server records a site
    that failed before it committed its ledger: the one case in which a ledger may lack a
    round. The round, and the releases cut."""
    ledger_file = run_dir / "ledgers" / f"{client}.json"
    data = json.loads(ledger_file.read_text())
    last = max(e["round"] for e in data["entries"])
    cut = [f"{e['name']}@round{last}" for e in data["entries"] if e["round"] == last]
    data["entries"] = [e for e in data["entries"] if e["round"] != last]
    ledger_file.write_text(json.dumps(data))
    rows = _rows(run_dir / "transcript.jsonl")
    reply = [r for r in rows if r["round"] == last and r["sender"] == client]
    refusal = {
        "round": last,
        "stage": reply[0]["stage"],
        "sender": client,
        "receiver": "server",
        "status": "refused",
        "field": None,
        "reason": "dropped out (RuntimeError)",
    }
    at = rows.index(reply[0])
    kept = [*rows[:at], refusal, *[r for r in rows[at:] if r not in reply]]
    _write_rows(run_dir / "transcript.jsonl", kept)
    return last, cut


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="numpy") as fh:
        return dict(fh.metadata() or {})


def _set_metadata(path: Path, **changes: str) -> None:
    save_file(load_file(str(path)), str(path), metadata=_metadata(path) | changes)


# The records a run writes beside the transcript that say who was added or refused in a round:
# the server's saved state, the metrics, each client's own state, and a Flower server's
# engine.json (a simulation writes none; written here as a Flower server would).
WITNESSES = (SERVER_STATE, METRICS, CLIENT_STATES, ENGINE)


def _write_engine(run_dir: Path, refused: dict[int, dict[str, str]]) -> None:
    rounds = json.loads((run_dir / "results.json").read_text())["rounds"]
    summary = {"rounds": rounds, "refused": [refused.get(r, {}) for r in range(rounds)]}
    (run_dir / ENGINE).write_text(json.dumps(summary))


def _agree(run_dir: Path, client: str, last: int, witness: str) -> None:
    """Make `witness` say what a real dropout of `client` in round `last` leaves there: the
    server added one reply fewer, the metrics count one refusal more, the client's state is the
    one it saved with its reply to the round before, and engine.json records the refusal."""
    if witness == SERVER_STATE:
        state = run_dir / SERVER_STATE
        _set_metadata(state, contributions=str(int(_metadata(state)["contributions"]) - 1))
    elif witness == METRICS:
        rows = _rows(run_dir / METRICS)
        for row in rows:
            row["refused"] += row["round"] == last
        _write_rows(run_dir / METRICS, rows)
    elif witness == CLIENT_STATES:
        state = run_dir / CLIENT_STATES / f"{client}.safetensors"
        ledger = ledger_module.PrivacyLedger.load(run_dir / "ledgers" / f"{client}.json")
        outbox = json.loads(_metadata(state)["outbox"]) | {"round": last - 1}
        _set_metadata(state, ledger=json.dumps(ledger.to_json(), sort_keys=True), outbox=json.dumps(outbox))
    else:
        _write_engine(run_dir, {last: {client: "dropped out (RuntimeError)"}})


def _remove(run_dir: Path, witness: str) -> None:
    import shutil

    if (run_dir / witness).is_dir():
        shutil.rmtree(run_dir / witness)
    else:
        (run_dir / witness).unlink()


@pytest.mark.slow
def test_a_client_that_dropped_out_may_lack_the_round_it_refused(dp_run, tmp_path):
    """The same ledger cut, with the transcript saying that client-1 refused its last round (as
    a site that fails before committing its ledger does), and every other record saying so too:
    the ledger may lack that round."""
    out, _ = dp_run
    tampered = tmp_path / "dropped"
    _copy(out, tampered)
    rows = _rows(tampered / "transcript.jsonl")
    last, _ = _forge_a_refusal(tampered, "client-1")
    for witness in WITNESSES:
        _agree(tampered, "client-1", last, witness)
    _passes(tampered)
    # Negative control: the refusal without the cut reply still leaves a release the ledger lacks.
    refusal = next(r for r in _rows(tampered / "transcript.jsonl") if r["status"] == "refused")
    at = next(i for i, r in enumerate(rows) if r["round"] == last and r["sender"] == "client-1")
    _write_rows(tampered / "transcript.jsonl", [*rows[:at], refusal, *rows[at:]])
    assert any(p.startswith("client-1: its ledger holds") for p in _problems(tampered))


@pytest.mark.slow
def test_a_ledger_tail_cut_behind_a_forged_refusal_fails_the_audit(dp_run, tmp_path):
    """The edit above alone (client-1's last DP-SGD release cut from its ledger, its reply
    replaced by a refusal row) understated its epsilon and passed. The records the edit left
    alone contradict it, each naming the round or the client and the file."""
    out, _ = dp_run
    tampered = tmp_path / "forged"
    _copy(out, tampered)
    spent = _ledger_epsilon(tampered / "ledgers" / "client-1.json")
    last, cut = _forge_a_refusal(tampered, "client-1")
    assert _ledger_epsilon(tampered / "ledgers" / "client-1.json") < spent
    assert _problems(tampered) == [
        _added(last, 3, 2, "client-1"),
        _counted(last, "metrics.jsonl", "counts 0 refused replies", "records 1 (client-1)"),
        _lacks("client-1", last, cut),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("witness", WITNESSES)
def test_each_record_of_the_round_alone_catches_a_forged_refusal(dp_run, tmp_path, witness):
    """Every record but `witness` made to agree with the forged refusal (as after a real
    dropout): `witness`, as the run wrote it, fails the audit alone. The control: the unedited
    run with it passes; made to agree too, the edit is a dropout and passes; absent (a Flower
    server's directory has no metrics, server state or client states), it is not checked."""
    out, _ = dp_run
    tampered = tmp_path / "forged"
    _copy(out, tampered)
    if witness == ENGINE:
        _write_engine(tampered, {})  # no refusal, as a Flower server would have written it
    _passes(tampered)
    last, cut = _forge_a_refusal(tampered, "client-1")
    for other in WITNESSES[:3]:
        if other != witness:
            _agree(tampered, "client-1", last, other)
    expected = {
        SERVER_STATE: _added(last, 3, 2, "client-1"),
        METRICS: _counted(last, "metrics.jsonl", "counts 0 refused replies", "records 1 (client-1)"),
        CLIENT_STATES: _lacks("client-1", last, cut),
        ENGINE: _counted(last, "engine.json", "records refusals of []", "of [client-1]"),
    }
    assert _problems(tampered) == [expected[witness]]
    _remove(tampered, witness)
    _passes(tampered)


@pytest.mark.slow
def test_a_client_state_whose_outbox_the_ledger_does_not_cover_fails_the_audit(dp_run, tmp_path):
    """A client saves its state after committing its ledger and before its reply leaves: the
    round of its last reply must be on its ledger file even where the state's copy of the
    ledger was rewritten along with the file."""
    out, _ = dp_run
    tampered = tmp_path / "outbox"
    _copy(out, tampered)
    last, cut = _forge_a_refusal(tampered, "client-1")
    for witness in (SERVER_STATE, METRICS):
        _agree(tampered, "client-1", last, witness)
    state = tampered / CLIENT_STATES / "client-1.safetensors"
    ledger = ledger_module.PrivacyLedger.load(tampered / "ledgers" / "client-1.json")
    _set_metadata(state, ledger=json.dumps(ledger.to_json(), sort_keys=True))  # the copy cut too
    assert _problems(tampered) == [_lacks("client-1", last, cut)]
    _agree(tampered, "client-1", last, CLIENT_STATES)  # its outbox: the round before (control)
    _passes(tampered)


@pytest.mark.slow
def test_a_client_deleted_with_its_transcript_rows_fails_the_audit(dp_run, tmp_path):
    """Deleting client-2's ledger and every transcript row to or from it left a consistent run of
    2 clients; config.json says 3."""
    out, _ = dp_run
    tampered = tmp_path / "missing"
    _copy(out, tampered)
    _passes(tampered)  # negative control
    (tampered / "ledgers" / "client-2.json").unlink()
    rows = _rows(tampered / "transcript.jsonl")
    _write_rows(
        tampered / "transcript.jsonl", [r for r in rows if "client-2" not in (r["sender"], r["receiver"])]
    )
    last = max(r["round"] for r in rows)
    assert _problems(tampered) == [
        "config.json has 3 clients, ledgers/ holds ledgers of 2: a client's records are missing or extra",
        "config.json has 3 clients, the server addressed 2: a client's records are missing or extra",
        _added(last, 3, 2),
        "client-2: client-states/client-2.safetensors holds a copy of its ledger, ledgers/ holds none",
    ]


@pytest.mark.slow
def test_a_ledger_under_another_clients_name_fails_the_audit(dp_run, tmp_path):
    out, _ = dp_run
    tampered = tmp_path / "renamed"
    _copy(out, tampered)
    ledgers = tampered / "ledgers"
    (ledgers / "client-2.json").write_text((ledgers / "client-1.json").read_text())
    assert "client-2: ledgers/client-2.json holds the ledger of 'client-1'" in _problems(tampered)


@pytest.mark.slow
def test_a_release_received_twice_with_different_contents_fails_the_audit(dp_run, tmp_path):
    """A (round, client, field) twice with two digests is one release drawn twice; the identical
    bytes twice (a client resending its saved reply after a crash) is not (negative control)."""
    out, _ = dp_run
    tampered = tmp_path / "twice"
    _copy(out, tampered)
    rows = _rows(tampered / "transcript.jsonl")
    first = next(r for r in rows if r["sender"] == "client-0" and r.get("dp_event") and r["round"] == 2)
    at = rows.index(first) + 1
    _write_rows(tampered / "transcript.jsonl", [*rows[:at], dict(first), *rows[at:]])
    _passes(tampered)  # the identical bytes resent
    other = dict(first, sha256="0" * 64, message_sha256="1" * 64)
    _write_rows(tampered / "transcript.jsonl", [*rows[:at], other, *rows[at:]])
    (problem,) = _problems(tampered)
    digests = ", ".join(sorted(d[:12] for d in (first["sha256"], other["sha256"])))
    assert problem == (
        f"client-0: the server received {first['field']!r} of round 2 2 times with different contents "
        f"(sha256 {digests}): a release drawn twice"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("key", "same", "other"),
    [("min_clients", 3, 2), ("noise_placement", "local", None), ("sample_rate", 1.0, 0.5)],
)
def test_a_configuration_that_is_not_the_plans_fails_the_audit(dp_run, tmp_path, key, same, other):
    """min_clients (and the other public settings the plan was calibrated from) must be the
    plan's. The same value written out (min_clients 3 for "every client", placement "local",
    the default under dp) passes: the negative control. The split placement against the plan
    is tested on a split run (tests/federation/test_secure.py)."""
    out, _ = dp_run
    tampered = tmp_path / key
    _copy(out, tampered)
    config_file = tampered / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(config | {key: same}))
    _passes(tampered)
    if other is None:  # split under dp is not a configuration at all: the audit cannot read it
        config_file.write_text(json.dumps(config | {key: "split"}))
        audit = runner.invoke(app, ["audit", str(tampered)])
        assert audit.exit_code == 2 and "corrupt run files (split noise is sound only" in audit.output
        return
    config_file.write_text(json.dumps(config | {key: other}))
    (problem,) = _problems(tampered)
    assert problem.startswith(f"config.json gives {key} {other!r}, dp_plan.json (or protocol.json) {same!r}")


@pytest.mark.slow
def test_a_ledger_without_its_noise_source_fails_the_audit(dp_run, tmp_path):
    """The noise source is hashed into each ledger's first link: relabelling it breaks the chain;
    a ledger written without one (the format before it was recorded) loads, as 'unknown', and
    fails the audit with its reason."""
    out, _ = dp_run
    tampered = tmp_path / "noise"
    _copy(out, tampered)
    ledger_file = tampered / "ledgers" / "client-0.json"
    assert json.loads(ledger_file.read_text())["noise"] == "private"
    _rewrite(ledger_file, lambda d: d.update(noise="seeded"), consistently=False)
    problems = _problems(tampered)
    assert problems[0].startswith("client-0: ") and "ledger of client-0: entry 0" in problems[0]
    assert "does not chain" in problems[0]
    _rewrite(ledger_file, lambda d: d.pop("noise"), consistently=True)  # the old format
    assert ledger_module.PrivacyLedger.load(ledger_file).noise_source == "unknown"
    assert _problems(tampered) == [
        "client-0: its ledger records no source for its DP noise (written before securegmi recorded it, "
        "or by other code), config.json says dp_noise 'private': no DP guarantee holds for its releases"
    ]


@pytest.mark.slow
def test_a_client_erased_from_an_em_run_fails_the_audit(em_run, tmp_path):
    """client-2's ledger, state and transcript rows deleted and config.json's clients lowered to
    2: a consistent run of two clients, but for the records written by the run itself (the
    results, the model's mixture weights, one row per client) and the server's count of what
    its last sums add."""
    tampered = tmp_path / "erased"
    _copy(em_run, tampered)
    _passes(tampered)  # negative control
    (tampered / "ledgers" / "client-2.json").unlink()
    (tampered / CLIENT_STATES / "client-2.safetensors").unlink()
    rows = _rows(tampered / "transcript.jsonl")
    _write_rows(
        tampered / "transcript.jsonl", [r for r in rows if "client-2" not in (r["sender"], r["receiver"])]
    )
    config = json.loads((tampered / "config.json").read_text())
    (tampered / "config.json").write_text(json.dumps(config | {"clients": 2}))
    last = max(r["round"] for r in rows)
    counts = [
        f"config.json has 2 clients, {where} 3: a client's records are missing or extra"
        for where in (
            "results.json reports",
            "results.json evaluates",
            "model.safetensors holds the mixture weights (pi) of",
        )
    ]
    assert _problems(tampered) == [_added(last, 3, 2), *counts]
    # Each record alone: the model's weights, the results, the server's state.
    _remove(tampered, SERVER_STATE)
    assert _problems(tampered) == counts
    (tampered / "results.json").rename(tampered / "results.moved")
    assert _problems(tampered) == counts[2:]
    (tampered / "results.moved").rename(tampered / "results.json")
    _remove(tampered, "model.safetensors")
    assert _problems(tampered) == counts[:2]


@pytest.mark.slow
@pytest.mark.parametrize("bound", [2, 1])
def test_a_protocol_bound_to_fewer_shares_than_the_plans_cohort_fails_the_audit(dp_run, tmp_path, bound):
    """protocol.json's N is the fewest client shares a sum may add, which clients and server
    check each sum against; it must be the plan's minimum cohort (3, every client here)."""
    out, _ = dp_run
    tampered = tmp_path / "n"
    _copy(out, tampered)
    protocol_file = tampered / "protocol.json"
    protocol = json.loads(protocol_file.read_text())
    assert protocol["dims"]["N"] == 3
    protocol_file.write_text(json.dumps(protocol))  # rewritten, the same N (negative control)
    _passes(tampered)
    protocol["dims"]["N"] = bound
    protocol_file.write_text(json.dumps(protocol))
    assert _problems(tampered) == [
        f"protocol.json binds N (the fewest client shares a sum may add) to {bound}, dp_plan.json plans a "
        "minimum cohort of 3: the protocol is not this run's"
    ]


@pytest.mark.slow
def test_a_configuration_of_another_protocol_fails_the_audit(dp_run, tmp_path):
    """config.json relabelled secure (with the dp run's local placement, so that nothing else
    of the plan differs) is not the protocol the transcript was recorded under (protocol.json)."""
    out, _ = dp_run
    tampered = tmp_path / "relabelled"
    _copy(out, tampered)
    config_file = tampered / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(config | {"noise_placement": "local"}))
    _passes(tampered)  # negative control: local written out is the dp run's placement
    config_file.write_text(json.dumps(config | {"noise_placement": "local", "protocol": "secure"}))
    assert _problems(tampered) == [
        "config.json gives protocol 'secure', protocol.json names 'dp': the transcript was recorded under "
        "another protocol than the configuration's"
    ]


def _declare(run_dir: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = run_dir / "protocol.json"
    declared = json.loads(path.read_text())
    change(declared)
    path.write_text(json.dumps(declared))


def _update_stage(declared: dict[str, Any]) -> dict[str, Any]:
    return next(s for s in declared["stages"] if s["name"] == "update")


def _masses_public(declared: dict[str, Any]) -> None:
    for f in _update_stage(declared)["fields"]:
        if f["name"] == "masses":
            f["kind"] = "public"  # no longer a DP release: no ledger event needed


def _extra_uplink(declared: dict[str, Any]) -> None:
    extra = {**_update_stage(declared)["fields"][0], "name": "records", "description": "raw records"}
    _update_stage(declared)["fields"].append(extra)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "difference"),
    [
        (_masses_public, "update.masses recorded public, registered dp-release"),
        (_extra_uplink, "update.records undeclared"),
    ],
)
def test_a_rewritten_protocol_declaration_fails_the_audit(dp_run, tmp_path, change, difference):
    """protocol.json records the declaration that ran; the audit does not take it on trust:
    for a registered protocol it must be the registry's binding at its recorded dimensions.
    Negative control: the file rewritten unchanged passes."""
    out, _ = dp_run
    tampered = tmp_path / "declared"
    _copy(out, tampered)
    _declare(tampered, lambda declared: None)
    _passes(tampered)
    _declare(tampered, change)
    assert _problems(tampered) == [
        f"protocol.json is not protocol 'dp' as registered here, bound at its recorded dimensions "
        f"({difference}): the transcript is checked against the registered declaration"
    ]


@pytest.mark.slow
def test_the_audit_reads_the_ledgers_from_where_it_is_told(dp_run, tmp_path):
    """A Flower server's directory holds no ledgers (each site keeps its own): `--ledgers`
    names the folder they were gathered into. Negative control: without it the audit fails."""
    import shutil

    out, _ = dp_run
    server = tmp_path / "server"
    _copy(out, server)
    shutil.move(server / "ledgers", tmp_path / "gathered")
    shutil.rmtree(server / CLIENT_STATES)  # a server holds no client's state either
    assert any("holds no ledger of it" in p for p in _problems(server))
    audit = runner.invoke(app, ["audit", str(server), "--ledgers", str(tmp_path / "gathered"), "--json"])
    assert audit.exit_code == 0, audit.output
    assert len(json.loads(audit.stdout)["budgets"]) == 3
    missing = runner.invoke(app, ["audit", str(server), "--ledgers", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "is not a folder of the clients' ledgers" in missing.output
    # A run directory that holds its own ledgers is audited on them: another folder in their
    # place (an edit of the run's own hidden behind a clean copy) is refused.
    own = runner.invoke(app, ["audit", str(out), "--ledgers", str(tmp_path / "gathered")])
    assert own.exit_code == 2 and "holds its own ledgers/" in own.output


@pytest.mark.slow
def test_a_plain_run_relabelled_as_an_unregistered_protocol_that_calls_its_fields_public_fails(tmp_path):
    """The consistent forgery of review 28: a plain run's protocol renamed to one not installed
    here and every uplink field re-declared public, in protocol.json, config.json, results.json
    and the transcript. Checked against that recorded declaration alone it would pass; the audit
    does not pass a declaration it cannot check unless the auditor says they trust it."""
    out = tmp_path / "plain"
    run_simulation(small_config(rounds=2), out=out)
    declared = json.loads((out / "protocol.json").read_text())
    declared["name"] = "plain-x"
    for stage in declared["stages"]:
        for f in stage["fields"] if stage["sender"] == "client" else ():
            f["kind"] = "public"
    (out / "protocol.json").write_text(json.dumps(declared))
    for name in ("config.json", "results.json"):
        _rewrite(out / name, lambda d: d.update(protocol="plain-x"), consistently=False)
    rows = _rows(out / "transcript.jsonl")
    for r in rows:
        if r["sender"] != "server" and r.get("kind") == "non-private":
            r["kind"] = "public"
    _write_rows(out / "transcript.jsonl", rows)
    audit = runner.invoke(app, ["audit", str(out)])
    assert audit.exit_code == 1 and "'plain-x' is not registered here" in audit.output
    # Trusted by the auditor, the recorded declaration is what the forgery says; the clients'
    # signatures are not: they signed the protocol's name and each field's kind.
    trusted = runner.invoke(app, ["audit", str(out), "--trust-recorded-protocol", "--json"])
    report = json.loads(trusted.stdout)
    assert trusted.exit_code == 1 and report["signature_problems"] == len(report["problems"]) == 3
    assert all("is not what the client signed" in p for p in report["problems"])
    # Negative control: the same forgery of an unsigned run (written before signatures) passes.
    _write_rows(out / "transcript.jsonl", [{k: v for k, v in r.items() if k != "signature"} for r in rows])
    (out / "signers.json").unlink()
    trusted = runner.invoke(app, ["audit", str(out), "--trust-recorded-protocol"])
    assert trusted.exit_code == 0 and "note: recorded only" in trusted.output
    assert "unsigned run" in trusted.output


@pytest.mark.slow
@pytest.mark.parametrize("event", ["moments@round00", "", None])
def test_a_transcript_row_naming_no_readable_event_is_a_problem_not_a_crash(dp_run, tmp_path, event):
    """The whole audit (review 28: `EventId.parse` raised out of the ledger lookup, exit 2, no
    report). Negative control: the untouched copy passes."""
    out, _ = dp_run
    tampered = tmp_path / "odd"
    _copy(out, tampered)
    _passes(tampered)
    rows = _rows(tampered / "transcript.jsonl")
    row = next(r for r in rows if r["sender"] == "client-0" and r.get("event") == "moments@round0")
    if event is None:
        del row["event"]
    else:
        row["event"] = event
    _write_rows(tampered / "transcript.jsonl", rows)
    audit = runner.invoke(app, ["audit", str(tampered), "--json"])
    assert audit.exit_code == 1, audit.output
    problem = f"client-0: 'moments' names events no ledger entry covers: {event}"
    assert problem in json.loads(audit.stdout)["problems"]
