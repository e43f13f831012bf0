"""kill -9 and `securegmi resume`: a run saves the server's and every client's state after each
round; a real `securegmi simulate` process group killed mid-run is continued to its planned end,
no release is drawn twice (a resent round gets the identical bytes), no ledger charges a
(round, release) twice, and the audit passes. Clear errors for what cannot be resumed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from securegmi.cli.main import app
from securegmi.records.rundir import RESULTS, SERVER_STATE

runner = CliRunner()
ARGS = ["--dataset", "synthetic", "--clients", "4", "--local-epochs", "1", "--epsilon", "4"]


def _saved_round(run_dir: Path) -> int:
    try:
        with safe_open(str(run_dir / SERVER_STATE), framework="numpy") as fh:
            return int((fh.metadata() or {})["next_round"])
    except Exception:  # not written yet, or being replaced
        return -1


def _kill_mid_run(run_dir: Path, after_round: int) -> None:
    """Start `securegmi simulate` in its own process group; SIGKILL the group once the run has
    saved `after_round` rounds."""
    command = [sys.executable, "-c", "from securegmi.cli.main import main; main()", "simulate", *ARGS]
    process = subprocess.Popen(
        [*command, "--out", str(run_dir)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    try:
        while _saved_round(run_dir) < after_round:
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "the run saved no rounds in time"
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (run_dir / RESULTS).exists(), "killed after it finished: nothing was tested"


@pytest.mark.slow
def test_a_killed_run_resumes_to_its_end_without_a_second_release(tmp_path):
    run_dir = tmp_path / "run"
    _kill_mid_run(run_dir, after_round=3)
    killed_at = _saved_round(run_dir)
    result = runner.invoke(app, ["resume", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    results = json.loads((run_dir / RESULTS).read_text())
    planned = json.loads((run_dir / "config.json").read_text())
    assert results["rounds"] == _saved_round(run_dir) > killed_at
    rounds = [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds == sorted(set(rounds)) and rounds[-1] == results["rounds"] - 1  # each round once
    assert planned["epsilon"] == 4.0
    # No ledger charges a (round, release) twice, and each stays within its budget.
    for path in sorted((run_dir / "ledgers").glob("*.json")):
        keys = [(e["round"], e["name"]) for e in json.loads(path.read_text())["entries"]]
        assert len(keys) == len(set(keys)) and len(keys) == results["rounds"], path.name
    # A round resent after the kill was answered with the identical bytes: one digest per field.
    digests: dict[tuple[int, str, str], set[str]] = defaultdict(set)
    for row in map(json.loads, (run_dir / "transcript.jsonl").read_text().splitlines()):
        if row["sender"] != "server" and row.get("field"):
            digests[(row["round"], row["sender"], row["field"])].add(row["sha256"])
    assert digests and all(len(d) == 1 for d in digests.values())
    assert runner.invoke(app, ["audit", str(run_dir)]).exit_code == 0


@pytest.mark.slow
def test_what_cannot_be_resumed_is_one_clear_line(tmp_path):
    finished = tmp_path / "finished"
    assert runner.invoke(app, ["simulate", *ARGS, "--out", str(finished)]).exit_code == 0
    cases = {"finished": "is a finished run"}
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    for name in ("config.json", "protocol.json", "dp_plan.json", "transcript.jsonl"):
        (stopped / name).write_bytes((finished / name).read_bytes())
    cases["stopped"] = f"has no {SERVER_STATE}"
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_bytes((finished / "config.json").read_bytes())
    (corrupt / SERVER_STATE).write_bytes(b"\x00" * 40)
    # The state's header is read first: it holds the digest the configuration is checked against.
    cases["corrupt"] = f"{SERVER_STATE}: it is not a safetensors file securegmi wrote"
    shutil.copytree(finished / "client-keys", tmp_path / "no-keys" / "client-keys")
    for name in ("config.json", SERVER_STATE):
        (tmp_path / "no-keys" / name).write_bytes((finished / name).read_bytes())
    (tmp_path / "no-keys" / "client-keys" / "secret.ckks").unlink()
    cases["no-keys"] = "client-keys needs both secret.ckks and public.ckks"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"version": 99, "knobs": "?"}))
    cases["foreign"] = "no readable config.json"
    cases["missing"] = "no readable config.json"
    for name, message in cases.items():
        result = runner.invoke(app, ["resume", str(tmp_path / name)])
        assert result.exit_code == 2 and message in result.output, (name, result.output)
        assert "Traceback" not in result.output
