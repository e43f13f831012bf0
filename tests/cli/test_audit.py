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
    result = run_simulation(SimulationConfig(**SMALL, protocol="dp", epsilon=2.0), protocol=dp.build, out=out)
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
    (problem,) = _problems(tampered)
    assert problem.startswith("client-2: ledger entry") and "the plan decided" in problem
    plan_file = tampered / "dp_plan.json"
    plan = json.loads(plan_file.read_text())
    _inflate(plan, 10.0)
    plan["sgd_noise_multiplier"] *= 10.0
    plan_file.write_text(json.dumps(plan))
    assert any("not the plan securegmi calibrates" in p for p in _problems(tampered))


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
