"""`securegmi.load` and `securegmi infer`: a trained run used on new records."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import securegmi
from securegmi.cli.main import app
from securegmi.config import SimulationConfig
from securegmi.simulation.study import load_federated_data
from tests.configs import private_config, small_config

RUNS = {
    "plain": small_config(clients=6, rounds=10, local_epochs=2),
    "private": private_config("secure", 8.0, clients=8),
}
runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):  # type: ignore[no-untyped-def]
    base = tmp_path_factory.mktemp("trained")
    for name, config in RUNS.items():
        securegmi.simulate(config, out=base / name)
    return base


def _one_source(config: SimulationConfig, source: int, n: int = 60) -> np.ndarray:
    data = load_federated_data(config)
    x = np.concatenate([np.concatenate([c.x_train, c.x_test]) for c in data.clients])
    s = np.concatenate([np.concatenate([c.source_train, c.source_test]) for c in data.clients])
    return x[s == source][:n]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_a_site_of_one_source_gets_its_pi_and_labels(trained, name):
    model = securegmi.load(trained / name)
    assert (model.identifier is not None) == (name == "private")  # the statistics design's identifier
    for source in range(3):
        x = _one_source(RUNS[name], source)
        pi = model.estimate_pi(x)
        assert pi.sum() == pytest.approx(1.0) and pi.max() > 0.8
        labels = model.assign(x)
        assert labels.shape == (len(x),) and set(labels) <= set(range(model.n_components))
        assert np.isfinite(model.log_density(x)).all()
    assert model.sample(4).shape == (4 * model.n_components, model.data_dim)
    assert model.sample(2, component=1).shape == (2, model.data_dim)


@pytest.mark.slow
def test_bad_records_and_bad_directories_are_clear_errors(trained, tmp_path):
    model = securegmi.load(trained / "plain")
    good = _one_source(RUNS["plain"], 0, 5)
    with pytest.raises(securegmi.DataError, match="features"):
        model.assign(good[:, :-1])
    with pytest.raises(securegmi.DataError, match="NaN"):
        model.assign(np.where(np.eye(len(good), good.shape[1]) > 0, np.nan, good))
    with pytest.raises(securegmi.DataError, match="non-empty"):
        model.assign(good[:0])
    with pytest.raises(securegmi.RunDirectoryError, match="not the directory of a finished run"):
        securegmi.load(tmp_path)


@pytest.mark.slow
def test_infer_prints_pi_as_json_and_writes_assignments(trained, tmp_path):
    x = _one_source(RUNS["private"], 2)
    np.save(tmp_path / "site.npy", x)
    np.savetxt(tmp_path / "site.csv", x, delimiter=",", header=",".join(f"f{i}" for i in range(x.shape[1])))
    for data in ("site.npy", "site.csv"):
        out = tmp_path / f"{data}.assignments.csv"
        result = runner.invoke(
            app,
            ["infer", str(trained / "private"), "--data", str(tmp_path / data), "--json", "--out", str(out)],
        )
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["records"] == len(x) and sum(report["pi"]) == pytest.approx(1.0, abs=1e-5)
        assert sum(report["assigned_counts"]) == len(x) and max(report["pi"]) > 0.8
        rows = np.loadtxt(out, delimiter=",", skiprows=1)
        assert rows.shape == (len(x), 2 + 3) and np.allclose(rows[:, 2:].sum(1), 1.0, atol=1e-4)


@pytest.mark.slow
def test_infer_refuses_bad_input_in_one_line(trained, tmp_path):
    (tmp_path / "bad.csv").write_text("1,2\n3,4\n")
    cases = [
        ([str(trained / "plain"), "--data", str(tmp_path / "bad.csv")], "features"),
        ([str(tmp_path), "--data", str(tmp_path / "bad.csv")], "not the directory of a finished run"),
        ([str(trained / "plain"), "--data", str(tmp_path / "missing.npy")], "does not exist"),
    ]
    for args, reason in cases:
        result = runner.invoke(app, ["infer", *args])
        message = " ".join(result.output.split())  # rich wraps long lines at the terminal width
        assert result.exit_code == 2 and reason in message  # the CLI's exit code for a user error
        assert "Traceback" not in result.output and message.count("error:") == 1
