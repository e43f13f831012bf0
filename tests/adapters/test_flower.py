"""securegmi on Flower: the simulation engine runs the same study as the in-process engine, and
a real SuperLink with SuperNodes on loopback completes a secure run. Real Flower, Ray, Opacus
and TenSEAL throughout; every process a test starts is stopped by PID."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

pytest.importorskip("flwr")

from typer.testing import CliRunner

from securegmi.adapters.flower import client_app, loopback_environment, open_aggregate, server_app
from securegmi.adapters.flower_study import run_flower_simulation, study_client, study_server
from securegmi.adapters.loopback import (
    LoopbackDeployment,
    LoopbackRayHead,
    descendants,
    group_alive,
    group_members,
    listening_addresses,
    off_loopback,
)
from securegmi.cli.main import app
from securegmi.config import SimulationConfig
from securegmi.crypto.keys import SecretContext
from securegmi.protocol import read_transcript
from securegmi.records.audit import audit_run
from securegmi.records.rundir import AGGREGATE, CHECKPOINT, CLIENT_STATES, ENGINE, LEDGERS, TRANSCRIPT
from securegmi.records.trained import load
from securegmi.simulation.runner import run_simulation, signing_ceremony
from securegmi.simulation.study import Federation
from tests.configs import IDENTIFIER_STEPS

from ..no_pickle import non_data_files
from ..secret_walk import secret_serialisations

ROOT = Path(__file__).resolve().parents[2]
# Split DP-SGD (one step per round, one Adam trajectory every client must restore from its
# state), short: 6 statistics rounds and 4 steps.
SECURE = SimulationConfig(
    clients=3,
    epsilon=8.0,
    protocol="secure",
    dp_noise="seeded",
    sgd_placement="split",
    vae_rounds=1,
    local_epochs=1,
    identifier_steps=IDENTIFIER_STEPS,  # the classifier's state restored per message too
)

pytestmark = pytest.mark.slow
runner = CliRunner()


def _listening_in_groups(pgids: list[int]) -> list[str]:
    return listening_addresses(pid for pgid in pgids for pid in group_members(pgid))


def _command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class ListeningWatch:
    """Polls, in a thread, every socket this test's descendant processes listen on (Ray's
    among them while the simulation engine runs), and which of them are a Ray cluster's GCS."""

    def __enter__(self) -> ListeningWatch:
        self.seen: set[str] = set()
        self.ray_gcs: set[int] = set()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self) -> None:
        while not self.done.is_set():
            pids = descendants(os.getpid())
            self.seen.update(listening_addresses(pids))
            self.ray_gcs.update(pid for pid in pids if _command_name(pid) == "gcs_server")
            self.done.wait(0.3)

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()


def _ledgers(run_dir: Path) -> list[dict]:
    """Each ledger file, its entries without their signatures (each run's clients have keys of
    their own)."""
    ledgers = [json.loads(p.read_text()) for p in sorted((run_dir / LEDGERS).glob("*.json"))]
    for ledger in ledgers:
        assert all(e.pop("signature") for e in ledger["entries"])  # every entry is signed
    return ledgers


def test_simulation_engine_matches_in_process(tmp_path):
    """Same seeds, same (seeded, test-only) DP noise: the same components within CKKS tolerance,
    the same pi estimates and identical ledgers; both run directories pass the audit."""
    local = run_simulation(SECURE, out=tmp_path / "local")
    with ListeningWatch() as watch:
        flower = run_flower_simulation(SECURE, tmp_path / "flower")
    # Ray and Flower listened, and only on loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0).
    assert watch.seen and off_loopback(sorted(watch.seen)) == [], watch.seen
    # The run started a Ray of its own, and the watch sees its GCS (the control for the test
    # that a run told to join a cluster starts none).
    assert len(watch.ray_gcs) == 1

    a, b = load_file(str(tmp_path / "local" / CHECKPOINT)), load_file(str(tmp_path / "flower" / CHECKPOINT))
    # Both went through the 1e-6 release grid; CKKS noise can move a value across one step,
    # and an Adam step can turn such a step on a near-zero gradient into up to 2 x lr.
    gap = np.abs(a["components"] - b["components"])
    assert (gap <= 2e-6).mean() > 0.999 and gap.max() <= 5e-3
    assert np.abs(a["pi"] - b["pi"]).max() <= 1e-6
    assert _ledgers(tmp_path / "local") == _ledgers(tmp_path / "flower")
    assert len(_ledgers(tmp_path / "flower")) == 3
    assert flower.privacy == local.privacy
    assert flower.evaluation.source_accuracy == pytest.approx(local.evaluation.source_accuracy, abs=0.02)
    for run in ("local", "flower"):
        report = audit_run(tmp_path / run)
        # Seeded noise is for tests only: the audit says so, and nothing else.
        assert all("seeded" in problem for problem in report.problems), report.problems
        # Both engines' clients signed every reply and entry, which the servers checked.
        assert report.signature_problems == 0 and report.signed_messages > 0 and report.signed_entries > 0
    # Negative control: the same study with other (private) noise gives other pi estimates, so
    # the tolerances above can fail.
    private = replace(SECURE, dp_noise="private")
    run_simulation(private, out=tmp_path / "private")
    c = load_file(str(tmp_path / "private" / CHECKPOINT))
    assert np.abs(c["pi"] - b["pi"]).max() > 1e-3
    # The run directory an auditor receives holds no secret key.
    for path in (tmp_path / "flower").rglob("*"):
        assert path.is_dir() or b"secret" not in path.name.encode()


def test_simulation_engine_joins_a_running_ray_cluster(tmp_path):
    """`ray_address` (`securegmi simulate --engine flower --ray-address`): the SuperNodes run on
    a Ray cluster that was already running, the run starts no Ray of its own, and it is the same
    run as in-process (same seeds, same seeded noise)."""
    local = run_simulation(SECURE, out=tmp_path / "local")
    with LoopbackRayHead(tmp_path) as head, ListeningWatch() as watch:
        cluster = run_flower_simulation(SECURE, tmp_path / "cluster", ray_address=head.address)
    # The only GCS that ran is the head's: a run that started its own Ray would show a second
    # one (the in-process comparison test shows the watch sees it).
    assert watch.ray_gcs and watch.ray_gcs <= head.members, (watch.ray_gcs, head.members)
    assert off_loopback(sorted(watch.seen)) == [], watch.seen
    a, b = load_file(str(tmp_path / "local" / CHECKPOINT)), load_file(str(tmp_path / "cluster" / CHECKPOINT))
    assert np.abs(a["pi"] - b["pi"]).max() <= 1e-6
    assert _ledgers(tmp_path / "local") == _ledgers(tmp_path / "cluster")
    assert cluster.privacy == local.privacy
    report = audit_run(tmp_path / "cluster")
    assert all("seeded" in problem for problem in report.problems), report.problems


def test_a_client_over_budget_refuses_over_flower_and_the_round_completes(tmp_path):
    """client-1 planned for 2 rounds, the server runs 3: in round 2 its ledger refuses, nothing
    of that round leaves it, the server records the refusal as in-process and adds the others."""
    from flwr.simulation import run_simulation as flower_simulation

    loopback_environment(tmp_path / "home")
    # The em design has a rounds knob; under the statistics design a refusal in the statistics
    # phase abandons the round (minimum cohort), tested in tests/federation/test_statistics.py.
    em = {"clients": 3, "epsilon": 8.0, "protocol": "dp", "dp_noise": "seeded", "private_training": "em"}
    short = SimulationConfig(rounds=2, **em)
    config = SimulationConfig(rounds=3, **em)
    out = tmp_path / "run"

    def make_client(context):
        index = int(context.node_config["partition-id"])
        return study_client(short if index == 1 else config, out, index, None)

    flower_simulation(
        server_app=server_app(lambda context: study_server(config, out, None)),
        client_app=client_app(make_client),
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}},
    )
    refused = json.loads((out / ENGINE).read_text())["refused"]
    assert refused[:2] == [{}, {}]
    assert refused[2] == {"client-1": "client-1: refused by the client (BudgetExceededError)"}
    rows = list(read_transcript(out / TRANSCRIPT))
    refusals = [r for r in rows if r["status"] == "refused"]
    assert [(r["round"], r["sender"]) for r in refusals] == [(2, "client-1")]
    sent_by_1 = {r["round"] for r in rows if r["sender"] == "client-1" and r["status"] == "delivered"}
    assert sent_by_1 == {0, 1}
    ledger = json.loads((out / LEDGERS / "client-1.json").read_text())
    assert {e["round"] for e in ledger["entries"]} == {0, 1}
    assert ledger["accountant"] == "pld" and ledger["epsilon"] <= 8.0 * (1 + 1e-6)


def test_deployment_engine_on_loopback_completes_a_secure_run(tmp_path):
    """A SuperLink and three SuperNodes as processes on 127.0.0.1, the app started with
    `flwr run`; each node holds its own key directory, state and ledger, the server only the
    public context. The server's directory, audited with the ledgers gathered from the nodes
    (`audit_run(..., ledgers=)`, `securegmi audit --ledgers`), passes."""
    # One classifier step: each message starts a process here, and the simulation engine's test
    # above restores the classifier's state across several.
    config = SimulationConfig(clients=3, epsilon=8.0, protocol="secure", identifier_steps=1)
    federation = Federation.build(config)
    keys = tmp_path / "keys"
    SecretContext.generate(federation.ckks_parameters()).save(keys)
    # Each client's signing key beside it (every node here shares the one key directory and
    # reads its own key), the registry of public keys for the server and the audit.
    signing_ceremony(federation.client_ids, keys, tmp_path / "signers.json")
    public = tmp_path / "server-keys"
    public.mkdir()
    shutil.copy(keys / "public.ckks", public / "public.ckks")
    nodes = [
        {"partition-id": i, "state-dir": str(tmp_path / f"node-{i}"), "key-dir": str(keys)} for i in range(3)
    ]
    overrides = tmp_path / "overrides.toml"
    study = json.dumps(config.to_dict()).replace("'", "")
    overrides.write_text(
        f'study = \'{study}\'\nrun-dir = "{tmp_path / "server"}"\npublic-key = "{public / "public.ckks"}"\n'
        f'signers = "{tmp_path / "signers.json"}"\n'
    )
    with LoopbackDeployment(tmp_path / "flower", nodes) as deployment:
        pids = deployment.pids
        assert len(pids) == 4
        listening = _listening_in_groups(pids)
        result = deployment.run(ROOT / "examples" / "flower_app", overrides, timeout=500)
        listening += _listening_in_groups(pids)
    assert len(listening) >= 4 and off_loopback(listening) == [], listening
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not any(group_alive(pid) for pid in pids)  # stopped by PID, with their process groups

    server = tmp_path / "server"
    assert json.loads((server / ENGINE).read_text())["refused"] == [{}] * config.planned_rounds
    assert not list(server.rglob("secret*"))
    assert not audit_run(server).ok  # the sites keep their ledgers: the server's folder is empty
    gathered = tmp_path / "gathered-ledgers"
    gathered.mkdir()
    for i in range(3):
        assert (tmp_path / f"node-{i}" / CLIENT_STATES / f"client-{i}.safetensors").exists()
        shutil.copy(tmp_path / f"node-{i}" / LEDGERS / f"client-{i}.json", gathered)
    report = audit_run(server, ledgers=gathered, signers=tmp_path / "signers.json")
    assert report.ok, report.problems
    # Every reply the server took and every ledger entry is signed by its client's key.
    assert report.signers == "given" and report.signed_messages > 0
    assert report.signed_entries == sum(len(json.loads(p.read_text())["entries"]) for p in gathered.iterdir())
    assert [
        bad for d in (server, *(tmp_path / f"node-{i}" for i in range(3))) for bad in non_data_files(d)
    ] == []
    secret = SecretContext.load(keys, federation.ckks_parameters())
    leaked = [
        p
        for p in server.rglob("*")
        if p.is_file() and any(s in p.read_bytes() for s in secret_serialisations(secret))
    ]
    assert leaked == []  # no server-side file, log or transcript holds the secret key
    # The last split DP-SGD step's gradient sum (the default under secure), opened with the key.
    final = open_aggregate(server / AGGREGATE, federation.spec, secret)
    assert final["contributions"] == 3 and np.isfinite(final["aggregate"]).all()
    assert np.abs(final["aggregate"]).sum() > 0
    _export_is_a_run_the_tools_take(tmp_path, server, keys, config)


def _export_is_a_run_the_tools_take(
    tmp_path: Path, server: Path, keys: Path, config: SimulationConfig
) -> None:
    """`securegmi export`: a site holding the key opens the final aggregate and, with every
    site's ledger and pi gathered, the deployment becomes a run directory that `audit` (with no
    --ledgers), `load`, `infer` and `report` take."""
    sites = [arg for i in range(3) for arg in ("--site", str(tmp_path / f"node-{i}"))]
    out = tmp_path / "exported"
    # Negative controls: the server cannot open the secure aggregate, and a missing site's pi
    # and ledger cannot be made up.
    keyless = runner.invoke(app, ["export", str(server), *sites, "--out", str(out)])
    assert keyless.exit_code == 2 and "key" in keyless.output and "Traceback" not in keyless.output
    assert not out.exists()
    partial = runner.invoke(
        app, ["export", str(server), *sites[:4], "--out", str(out), "--key-dir", str(keys)]
    )
    assert partial.exit_code == 2 and "client-2" in partial.output, partial.output
    exported = runner.invoke(app, ["export", str(server), *sites, "--out", str(out), "--key-dir", str(keys)])
    assert exported.exit_code == 0, exported.output
    results = json.loads((out / "results.json").read_text())
    assert results["engine"] == "flower-deployment" and results["protocol"] == "secure"
    assert 0 < results["source_accuracy"] <= 1  # scored on the components opened with the key
    audit = runner.invoke(app, ["audit", str(out), "--json"])
    assert audit.exit_code == 0, audit.output
    assert len(json.loads(audit.output)["budgets"]) == 3
    model = load(out)
    states = [
        load_file(str(tmp_path / f"node-{i}" / CLIENT_STATES / f"client-{i}.safetensors")) for i in range(3)
    ]
    pis = np.stack([s["pi"] for s in states])
    # Each site's pi, passed through the release grid as an in-process secure run exports it;
    # in another order (the sites mixed up) the rows differ.
    assert np.abs(model.training_pi - pis).max() <= 1e-5
    assert np.abs(model.training_pi - pis[::-1]).max() > 1e-3
    site = tmp_path / "site.npy"
    np.save(site, Federation.build(config).data.clients[0].x_test)
    infer = runner.invoke(app, ["infer", str(out), "--data", str(site), "--json"])
    assert infer.exit_code == 0, infer.output
    assert len(json.loads(infer.output)["pi"]) == config.model_components
    report = runner.invoke(app, ["report", str(out), "--json"])
    assert report.exit_code == 0, report.output
    assert json.loads(report.output)["plots"]
    assert not list(out.rglob("secret*"))  # the key opened the aggregate and stayed with the site


def test_the_loopback_check_catches_a_process_listening_on_all_interfaces():
    """Negative control for the loopback assertion above."""
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "0", "--bind", "0.0.0.0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not _listening_in_groups([server.pid]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [a.split(":")[0] for a in off_loopback(_listening_in_groups([server.pid]))] == ["0.0.0.0"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait()
