"""The bring-your-own example end to end: your own conv VAE and loaders under the default
private design through `import securegmi` alone, saved, then `securegmi audit`, `infer` and
`report` on the saved directory; and the command line's rough edges."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from securegmi.cli.main import app
from securegmi.cli.simulate import default_out
from securegmi.config import SimulationConfig

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "bring_your_own_model.py"
FACTORY = f"{EXAMPLE}:my_component"
runner = CliRunner()


@pytest.fixture(scope="module")
def example_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    spec = importlib.util.spec_from_file_location("byo_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path_factory.mktemp("byo") / "run"
    return out, example.main(records=40, vae_rounds=1, local_epochs=1, out=out)


@pytest.mark.slow
def test_the_example_runs_the_default_private_design_and_scores_a_new_site(example_run):
    out, summary = example_run
    sites = summary["sites"]
    assert isinstance(sites, dict) and len(sites) == 8
    assert all(abs(sum(pi) - 1) < 0.01 for pi in sites.values())
    assert 7.0 < float(summary["epsilon_spent"]) <= 8.0 * (1 + 1e-6)  # type: ignore[arg-type]
    new = summary["new_site_pi"]
    assert isinstance(new, list) and abs(sum(new) - 1) < 0.01
    plan = json.loads((out / "dp_plan.json").read_text())
    assert plan["kind"] == "statistics"  # the default private design, not the em plan


@pytest.mark.slow
def test_audit_infer_and_report_accept_the_saved_run(example_run):
    out, _ = example_run
    audit = runner.invoke(app, ["audit", str(out), "--json"])
    assert audit.exit_code == 0, audit.output
    report = json.loads(audit.stdout)
    assert report["ok"] and len(report["budgets"]) == 8
    site = str(out.with_name(f"{out.name}-new-site.csv"))
    infer = runner.invoke(app, ["infer", str(out), "--data", site, "--components", FACTORY, "--json"])
    assert infer.exit_code == 0, infer.output
    assert json.loads(infer.stdout)["records"] == 40
    plots = runner.invoke(app, ["report", str(out), "--components", FACTORY, "--json"])
    assert plots.exit_code == 0, plots.output
    written = json.loads(plots.stdout)["plots"]
    assert {Path(p).name for p in written} >= {"pi.png", "privacy.png", "samples.png"}
    assert all(Path(p).read_bytes()[:4] == b"\x89PNG" for p in written)


@pytest.mark.slow
def test_the_saved_run_with_a_tampered_ledger_fails_the_command_line_audit(example_run, tmp_path):
    """Negative control: `securegmi audit` checks the saved run, it does not take it on trust."""
    run = Path(shutil.copytree(example_run[0], tmp_path / "run"))
    ledger = run / "ledgers" / "site-3.json"
    data = json.loads(ledger.read_text())
    data["budget"]["epsilon"] = 80.0
    ledger.write_text(json.dumps(data))
    audit = runner.invoke(app, ["audit", str(run)])
    assert audit.exit_code == 1 and "site-3" in audit.output


@pytest.mark.slow
def test_infer_refuses_raw_pixels_for_a_bernoulli_model_in_one_line(example_run, tmp_path):
    out, _ = example_run
    raw = tmp_path / "raw.csv"
    site = np.loadtxt(out.with_name(f"{out.name}-new-site.csv"), delimiter=",")
    np.savetxt(raw, site * 16, delimiter=",")  # 0-16 pixels, as load_digits gives them
    result = runner.invoke(app, ["infer", str(out), "--data", str(raw), "--components", FACTORY])
    assert result.exit_code == 2
    assert "[0, 1]" in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_run_of_your_own_components_needs_their_factory(example_run):
    out, _ = example_run
    site = str(out.with_name(f"{out.name}-new-site.csv"))
    result = runner.invoke(app, ["infer", str(out), "--data", site])
    assert result.exit_code == 2 and "components=" in result.output
    bad = runner.invoke(app, ["infer", str(out), "--data", site, "--components", "nope"])
    assert bad.exit_code == 2 and "module:function" in bad.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == "securegmi 0.1.0"


def test_piped_tables_are_not_cut_at_80_columns():
    """Through a pipe the console is wide, so a table's cells are whole; negative control:
    with COLUMNS=80 (what rich assumes for a pipe otherwise) the same table is cut."""
    probe = (
        "from rich.table import Table\n"
        "from securegmi.cli.app import console\n"
        "t = Table(*[f'column number {i}' for i in range(8)])\n"
        "t.add_row(*['weighted_components'] * 8)\n"
        "console.print(t)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    wide = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert "weighted_components" in wide.stdout and "…" not in wide.stdout
    narrow = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env={**env, "COLUMNS": "80"},
        check=True,
    )
    assert "…" in narrow.stdout


def test_a_private_run_and_a_plain_one_do_not_share_the_default_out():
    plain = default_out(SimulationConfig())
    private = default_out(SimulationConfig(epsilon=8.0, protocol="secure"))
    dp = default_out(SimulationConfig(epsilon=8.0, protocol="dp"))
    assert len({plain, private, dp}) == 3
    assert private == Path("runs/fedgmi-secure-eps8-seed0") and plain == Path("runs/fedgmi-plain-seed0")
    assert default_out(SimulationConfig(method="central-em")) == Path("runs/central-em-seed0")
