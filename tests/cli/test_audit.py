from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from securegmi.cli.main import app
from securegmi.config import SimulationConfig
from securegmi.privacy import ledger as ledger_module
from securegmi.protocols import dp, plain
from securegmi.simulation.runner import run_simulation

runner = CliRunner()
SMALL = {"dataset": "synthetic", "clients": 3, "rounds": 2, "local_epochs": 1, "hidden": 16, "latent": 2}


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "dp"
    # --rounds sets the EM designs' length only; the statistics design's is its own.
    private = {k: v for k, v in SMALL.items() if k != "rounds"}
    config = SimulationConfig(**private, protocol="dp", epsilon=2.0)
    result = run_simulation(config, protocol=dp.build, out=out)
    return out, result


@pytest.mark.slow
def test_a_dp_run_passes_the_audit(dp_run):
    out, result = dp_run
    assert result.privacy is not None
    assert result.privacy["max_spent"] <= 2.0 * (1 + 1e-6)
    assert result.privacy["max_spent_pld"] <= result.privacy["max_spent"]
    assert result.privacy["secure_rng"] is False
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
    the format would."""
    data = json.loads(path.read_text())
    change(data)
    if consistently:
        link = ledger_module._genesis(data["client"], data["budget"], data["adjacency"])
        for record in data["entries"]:
            record.pop("chain", None)
            link = ledger_module._link(link, record)
            record["chain"] = link
    path.write_text(json.dumps(data))


def _problems(run_dir: Path) -> list[str]:
    audit = runner.invoke(app, ["audit", str(run_dir), "--json"])
    assert audit.exit_code == 1, audit.output
    return list(json.loads(audit.stdout)["problems"])


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
    assert problems[0].startswith("client-2: ledger of client-2: entry 0") and "does not chain" in problems[0]
    assert all(p.startswith("client-2") for p in problems)
    ledger_file.write_text(original)
    _rewrite(ledger_file, lambda d: _inflate(d["entries"], 10.0), consistently=True)
    against_plan, against_transcript, understated = _problems(tampered)
    assert against_plan.startswith("client-2: ledger entry") and "the plan decided" in against_plan
    assert (
        against_transcript.startswith("client-2: the server received")
        and "ledger records" in against_transcript
    )
    assert understated.startswith("client-2: the releases the server received spend epsilon 2.0000")
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
        assert budget["epsilon_transcript"] == pytest.approx(budget["epsilon_rdp"], rel=1e-9)

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
    run_simulation(SimulationConfig(**SMALL), protocol=plain.build, out=tmp_path / "plain")
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
