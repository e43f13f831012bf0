"""Checks that narrow a client's state are explicit errors, not `assert`s: `python -O` drops
every `assert`, and a deployment may well run optimised. The checks run in a subprocess under
-O; its first line shows that -O is in force there (an `assert False` passes: the negative
control, which the same statements written as asserts would have failed with)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    assert False, "asserts are in force"
    print("asserts dropped")

    import numpy as np

    from securegmi.config import SimulationConfig
    from securegmi.errors import ConfigError, PrivacyError, ProtocolViolation
    from securegmi.federation.local import ClientSettings, LocalLearner
    from securegmi.federation.release import ClientPrivacy, CountsRelease, StatisticsRelease
    from securegmi.federation.statistics import StatisticsRole
    from securegmi.simulation.study import dp_plan, load_federated_data, new_model
    from securegmi.core.fine_clusters import group_clusters
    from securegmi.vocabulary import Stage


    def outcome(call):
        try:
            call()
        except (ConfigError, PrivacyError, ProtocolViolation) as exc:
            return f"{type(exc).__name__}: {exc}"
        return "no error"


    config = SimulationConfig(dataset="synthetic", clients=3, hidden=4, latent=1, protocol="dp", epsilon=8.0)
    data = load_federated_data(config)
    plan = dp_plan(config, data)  # the statistics design's
    x = data.clients[0].x_train
    learner = LocalLearner("client-0", x, new_model(config, data), ClientSettings(), 0)
    privacy = ClientPrivacy(plan, 1.0)
    print("counts on a statistics plan:", outcome(lambda: CountsRelease(learner, privacy)))
    role = StatisticsRole(x, plan.statistics, 2, 0, 1, 0, np.random.default_rng(0))
    print("clusters before the moments:", outcome(lambda: role.contribution(1)))
    last = plan.statistics.rounds - 1
    print("histogram before the moments:", outcome(lambda: role.absorb(last, np.zeros(4))))
    policy = StatisticsRelease(learner, privacy)
    t = plan.statistics.rounds + 1
    print("a VAE round before the phase:", outcome(lambda: policy.respond(t, Stage.BROADCAST, {})))
    print("no restarts:", outcome(lambda: group_clusters(np.ones((3, 4)), 2, 0, restarts=0)))
    """
)


@pytest.mark.parametrize("flags", [["-O"], []], ids=["optimised", "plain"])
def test_state_checks_raise_their_documented_errors_with_and_without_asserts(flags):
    done = subprocess.run(
        [sys.executable, *flags, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    if not flags:  # the negative control: without -O the script's own assert stops it
        assert done.returncode == 1 and "AssertionError: asserts are in force" in done.stderr
        return
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines()[1:])
    assert done.stdout.splitlines()[0] == "asserts dropped"
    assert lines["counts on a statistics plan"].startswith("PrivacyError: the em design's counts release")
    for case in (
        "clusters before the moments",
        "histogram before the moments",
        "a VAE round before the phase",
    ):
        assert lines[case].startswith("ProtocolViolation: this message needs "), case
        assert "has not released yet" in lines[case], case
    assert lines["no restarts"].startswith("ConfigError: grouping the fine clusters needs at least one")


def state_asserts(root: Path, folders: tuple[str, ...]) -> list[str]:
    """Every `assert` statement in the library's source."""
    return [
        f"{path.relative_to(root)}:{node.lineno}"
        for folder in folders
        for path in sorted((root / folder).rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assert)
    ]


def test_the_library_holds_no_assert():
    assert state_asserts(ROOT, ("securegmi", "protocols", "cli")) == []


def test_the_assert_check_finds_a_planted_assert(tmp_path):
    # Negative control.
    (tmp_path / "securegmi").mkdir()
    (tmp_path / "securegmi" / "a.py").write_text("def f(x):\n    assert x is not None\n    return x\n")
    assert state_asserts(tmp_path, ("securegmi",)) == ["securegmi/a.py:2"]
