"""`securegmi export` refuses, in one line and before writing anything, a Flower server's
directory whose run did not finish. The export of a finished deployment (a site opening the
secure aggregate, every site's ledger and pi gathered, audit/infer/report/load taking the
result) runs on a real loopback deployment in tests/adapters/test_flower.py."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from securegmi.cli.main import app
from securegmi.config import SimulationConfig
from securegmi.records.rundir import CONFIG

runner = CliRunner()


def test_export_refuses_a_server_directory_without_the_final_aggregate(tmp_path):
    server = tmp_path / "server"
    server.mkdir()
    (server / CONFIG).write_text(json.dumps(SimulationConfig(clients=3).to_dict()))
    out = tmp_path / "exported"
    result = runner.invoke(app, ["export", str(server), "--site", str(tmp_path), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "did not finish" in result.output and "Traceback" not in result.output
    assert not out.exists()
