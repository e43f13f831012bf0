from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from securegmi.cli.main import app
from securegmi.config import SimulationConfig

from ..results_document import check_results

runner = CliRunner()


def _config(run_dir: Path) -> SimulationConfig:
    return SimulationConfig.from_dict(json.loads((run_dir / "config.json").read_text()))


# Without the extra these reach the "needs Flower" message instead (tested on its own below).
NEEDS_FLOWER = pytest.mark.skipif(
    importlib.util.find_spec("flwr") is None, reason="extra 'flower' not installed"
)

SMALL = ["--dataset", "synthetic", "--clients", "4", "--rounds", "2", "--local-epochs", "1"]


@pytest.mark.slow
def test_simulate_then_report(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["simulate", *SMALL, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Summary" in result.output and "source accuracy" in result.output
    results = json.loads((out / "results.json").read_text())
    assert results["clients"] == 4 and results["method"] == "fedgmi"
    report = runner.invoke(app, ["report", str(out)])
    assert report.exit_code == 0, report.output
    for name in ("pi.png", "rounds.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_simulate_json_output_is_machine_readable(tmp_path):
    result = runner.invoke(app, ["simulate", *SMALL, "--out", str(tmp_path / "r"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout[result.stdout.index("{") :])
    check_results(data, _config(tmp_path / "r"))
    assert data == json.loads((tmp_path / "r" / "results.json").read_text())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["simulate", "--alpha", "-1"], "alpha must be positive"),
        (["simulate", "--method", "magic"], "method must be one of"),
        (["simulate", "--protocol", "nope"], "unknown protocol"),
        (["simulate", "--dataset", "cifar"], "dataset must be one of"),
        (["report", "/nonexistent/run"], "not a finished securegmi run"),
        (["simulate", "--ray-address", "127.0.0.1:6379"], "is for --engine flower"),
        pytest.param(
            ["simulate", "--engine", "flower", "--ray-address", "127.0.0.1:1"],
            "no Ray cluster answers",
            marks=NEEDS_FLOWER,
        ),
        pytest.param(
            ["simulate", "--engine", "flower", "--ray-address", "head-node"],
            "host:port or 'auto'",
            marks=NEEDS_FLOWER,
        ),
        (["simulate", "--threads", "0"], "--threads must be at least 1"),
        (["simulate", "--engine", "bogus"], "--engine must be inprocess or flower, got 'bogus'"),
    ],
)
def test_user_mistakes_are_messages_not_tracebacks(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output
    assert _one_error_line(result.output)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def _one_error_line(output: str) -> bool:
    lines = output.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("error: ")


def test_a_bad_parameter_raised_through_typer_is_a_user_error():
    # typer.BadParameter is click's class under typer 0.20 and typer's own under 0.29 (no longer
    # a click.ClickException, which once made it an "internal error", exit 70).
    import typer

    from securegmi.cli.app import errors_as_messages

    probe = typer.Typer()

    @probe.command()
    @errors_as_messages
    def wrapped() -> None:
        raise typer.BadParameter("--planted must be positive")

    @probe.command()
    def bare() -> None:
        raise typer.BadParameter("--planted must be positive")

    result = runner.invoke(probe, ["wrapped"])
    assert result.exit_code == 2 and _one_error_line(result.output), result.output
    assert "--planted must be positive" in result.output
    # Negative control: typer's own report of the same error is several lines (usage, a box),
    # so the one-line check can fail.
    unwrapped = runner.invoke(probe, ["bare"])
    assert unwrapped.exit_code == 2 and not _one_error_line(unwrapped.output)


def test_a_missing_flower_is_one_line_that_names_the_extra(monkeypatch):
    import sys

    # A None entry makes `import` raise ImportError, as on an install without the extra.
    monkeypatch.setitem(sys.modules, "securegmi.adapters.flower_study", None)
    result = runner.invoke(app, ["simulate", "--engine", "flower"])
    assert result.exit_code == 2 and _one_error_line(result.output), result.output
    # Printed as text, not rich markup (which swallowed "[flower]").
    assert "pip install 'securegmi[flower]'" in result.output


@pytest.mark.slow
def test_refuses_to_overwrite_a_run(tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, ["simulate", *SMALL, "--out", str(out)]).exit_code == 0
    again = runner.invoke(app, ["simulate", *SMALL, "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output


@pytest.mark.slow
def test_epsilon_alone_runs_the_secure_protocol_and_shows_the_plan(tmp_path):
    out = tmp_path / "private"
    # The statistics design takes --vae-rounds, not --rounds (6 statistics rounds, then 1 VAE round).
    private = [a for a in SMALL if a not in ("--rounds", "2")] + ["--vae-rounds", "1"]
    result = runner.invoke(app, ["simulate", *private, "--clients", "3", "--epsilon", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "Privacy plan" in text and "ChaCha20 keyed with 256 bits of OS entropy" in text
    assert "noise from ChaCha20 keyed with OS entropy" in text  # the summary says so too
    results = json.loads((out / "results.json").read_text())
    check_results(results, _config(out))
    assert results["protocol"] == "secure" and results["epsilon"]["target"] == 4.0
    # 3 k-means iterations at epsilon 4 (config.STATISTICS_SIZES), moments and histogram, the
    # source classifier's 40 steps, the VAEs' step
    assert results["rounds"] == 3 + 2 + 40 + 1
    assert runner.invoke(app, ["audit", str(out)]).exit_code == 0


def test_an_interrupted_run_says_where_its_rounds_are(tmp_path, monkeypatch):
    import securegmi.simulation.runner as run_module

    def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "run_simulation", interrupted)
    result = runner.invoke(app, ["simulate", *SMALL, "--out", str(tmp_path / "r")])
    assert result.exit_code == 130
    assert "interrupted" in result.output and "Traceback" not in result.output


def test_an_option_the_run_would_ignore_is_refused_before_anything_is_written(tmp_path):
    # Issue 24: under --epsilon (the statistics design) --rounds 12 went to config.json, unused.
    out = tmp_path / "r"
    result = runner.invoke(app, ["simulate", "--epsilon", "8", "--rounds", "12", "--out", str(out)])
    assert result.exit_code == 2 and _one_error_line(result.output), result.output
    assert "--rounds does not apply under the statistics design" in result.output
    assert "set --vae-rounds" in result.output
    assert not out.exists()


def _configs_the_cli_builds(monkeypatch, *runs: list[str]) -> list[SimulationConfig]:
    import securegmi.simulation.runner as run_module

    built = []

    def capture(config, *args, **kwargs):  # type: ignore[no-untyped-def]
        built.append(config)
        raise KeyboardInterrupt  # stops before any training

    monkeypatch.setattr(run_module, "run_simulation", capture)
    for args in runs:
        assert runner.invoke(app, ["simulate", *args]).exit_code == 130
    return built


def test_the_options_that_apply_reach_the_configuration(monkeypatch, tmp_path):
    # Negative control of the refusal above: what does apply is accepted and used.
    vae, em, central, fedgmi = _configs_the_cli_builds(
        monkeypatch,
        ["--epsilon", "8", "--vae-rounds", "2", "--out", str(tmp_path / "a")],
        ["--epsilon", "8", "--private-training", "em", "--rounds", "12", "--out", str(tmp_path / "b")],
        ["--method", "central-dp", "--epsilon", "8", "--out", str(tmp_path / "c")],
        ["--epsilon", "8", "--identifier-steps", "3", "--out", str(tmp_path / "d")],
    )
    # Under secure the VAEs' DP-SGD is split by default: one round per step, after the source
    # classifier's 40 (3 where asked).
    assert vae.split_sgd and vae.planned_rounds == 4 + 2 + 40 + 2 * 5 and em.planned_rounds == 12
    assert fedgmi.planned_identifier_steps == 3
    # central-dp sends no message, so --epsilon alone gives it no protocol (which it would refuse).
    assert central.protocol == "plain" and fedgmi.protocol == "secure"


@pytest.mark.slow
def test_report_draws_samples_of_each_component_for_image_data(tmp_path):
    out = tmp_path / "digits"
    args = ["simulate", "--dataset", "digits", "--clients", "3", "--rounds", "1", "--local-epochs", "1"]
    assert runner.invoke(app, [*args, "--out", str(out)]).exit_code == 0
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "privacy.png").exists()  # no ledgers: nothing was spent


def test_debug_shows_the_traceback_of_a_user_error():
    from securegmi.errors import ConfigError

    result = runner.invoke(app, ["--debug", "simulate", "--alpha", "-1"])
    assert result.exit_code != 0 and isinstance(result.exception, ConfigError)


def test_a_bug_is_one_line_that_says_so_and_debug_shows_it(monkeypatch, tmp_path):
    import securegmi.records.audit as audit_module

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("planted bug")

    monkeypatch.setattr(audit_module, "audit_run", broken)
    result = runner.invoke(app, ["audit", str(tmp_path)])
    assert result.exit_code == 70 and "Traceback" not in result.output
    assert "internal error" in result.output and "planted bug" in result.output
    assert isinstance(runner.invoke(app, ["--debug", "audit", str(tmp_path)]).exception, RuntimeError)


def test_the_docs_document_every_error_class():
    import inspect
    import re
    from pathlib import Path

    import securegmi.errors as errors

    classes = {
        name
        for name, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.SecureGMIError) and cls is not errors.SecureGMIError
    }
    page = (Path(__file__).resolve().parents[2] / "docs" / "guides" / "cli.md").read_text()
    section = page[page.index("## Errors and exit codes") :]
    assert set(re.findall(r"^\| `(\w+)` \|", section, flags=re.M)) == classes


def test_the_summary_names_where_the_noise_came_from():
    """It once said "noise not from a CSPRNG" of every run, ChaCha20-keyed ones included."""
    from securegmi.cli.simulate import _privacy_line

    privacy = {"max_spent": 8.0, "target": 8.0, "max_spent_rdp": 8.6, "delta": 1e-5, "placement": "local"}
    assert "noise from ChaCha20 keyed with OS entropy" in _privacy_line({**privacy, "secure_rng": True})
    # Control: seeded (test-only) noise is named as such.
    assert "SEEDED test noise" in _privacy_line({**privacy, "secure_rng": False})
