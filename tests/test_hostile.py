"""Hostile files and options on the CLI and `securegmi.load` (issue 25, point 5).

Every case a user (or whoever can write into a run directory) can bring ends cleanly: exit code
2 and one line that names the file and says why, nothing written or overwritten, and never a
hang: a FIFO is handed to every reader under a `FifoGuard`, which unblocks (and reports) a
reader that waits on it, so a regression fails instead of hanging CI. Negative controls show
what the plain standard-library call would have done with the same input.

One small finished private run (statistics design, 3 clients) is built per module; each test
works on a copy.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from typer.testing import CliRunner

import securegmi
from securegmi.cli.main import app
from securegmi.errors import ConfigError, RunDirectoryError, SecureGMIError
from securegmi.files import JSON_FILE, LEDGER_FILE, METRICS_FILE, MODEL_FILE, RECORDS_FILE, STATE_FILE
from securegmi.files import TRANSCRIPT_FILE as TRANSCRIPT_KIND
from securegmi.records.trained import TrainedMixture
from securegmi.simulation.runner import run_simulation
from securegmi.simulation.study import dp_plan, load_federated_data
from tests.configs import private_config

from .fifo_guard import FifoGuard

runner = CliRunner()
CONFIG = private_config(hidden=4, latent=1, vae_rounds=1)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "run"
    run_simulation(CONFIG, out=out)
    np.save(out.parent / "site.npy", np.random.default_rng(0).random((6, 10), dtype=np.float32))
    return out


def _copy(finished: Path, tmp_path: Path, name: str = "run", stopped: bool = False) -> Path:
    """A copy of the finished run; `stopped`: without results and model, as a run killed after
    its last round was saved (so `securegmi resume` takes it up)."""
    copy = tmp_path / name
    shutil.copytree(finished, copy, symlinks=True)
    if stopped:
        (copy / "results.json").unlink()
        (copy / "model.safetensors").unlink()
    return copy


def _snapshot(root: Path) -> dict[str, Any]:
    """Everything under `root` as (kind, content): regular files by digest (a planted sparse
    file over a cap by size and mtime: reading it would take gigabytes), links by target, other
    files by type only (a FIFO is never opened here)."""
    out: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        rel, info = str(path.relative_to(root)), path.lstat()
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            out[rel] = ("dir",)
        elif path.is_file() and info.st_size > 64 << 20:
            out[rel] = ("big", info.st_size, info.st_mtime_ns)
        elif path.is_file():
            out[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
        else:
            out[rel] = ("special",)
    return out


def _one_clean_line(result: Any, *needles: str) -> str:
    out = result.output.strip()
    assert result.exit_code == 2, out
    assert len(out.splitlines()) == 1, out
    assert "internal error" not in out and "Traceback" not in out
    for needle in needles:
        assert needle in out, (needle, out)
    return out


# ---------------------------------------------------------------------------------------------
# Readers: a FIFO, a link to /dev/zero, a file over its kind's cap, wherever a command reads.

READS = [
    ("audit", "config.json", JSON_FILE.limit),
    ("audit", "protocol.json", JSON_FILE.limit),
    ("audit", "transcript.jsonl", TRANSCRIPT_KIND.limit),
    ("report", "results.json", JSON_FILE.limit),
    ("report", "metrics.jsonl", METRICS_FILE.limit),
    ("report", "ledgers/client-1.json", LEDGER_FILE.limit),
    ("infer", "config.json", JSON_FILE.limit),
    ("infer", "model.safetensors", MODEL_FILE.limit),
    ("infer", "--data", RECORDS_FILE.limit),
    ("resume", "config.json", JSON_FILE.limit),
    ("resume", "server-state.safetensors", STATE_FILE.limit),
    ("resume", "client-states/client-1.safetensors", STATE_FILE.limit),
    ("resume", "ledgers/client-1.json", LEDGER_FILE.limit),
    ("resume", "metrics.jsonl", METRICS_FILE.limit),
    ("resume", "transcript.jsonl", TRANSCRIPT_KIND.limit),
]


def _args(command: str, run_dir: Path, data: Path) -> list[str]:
    return {
        "audit": ["audit", str(run_dir)],
        "report": ["report", str(run_dir)],
        "infer": ["infer", str(run_dir), "--data", str(data)],
        "resume": ["resume", str(run_dir)],
    }[command]


def _plant(path: Path, variant: str, limit: int) -> str:
    """Put the hostile file at `path`; return the words the error must say."""
    if os.path.lexists(path):
        path.unlink()
    if variant == "fifo":
        os.mkfifo(path)
        return "is a FIFO"
    if variant == "dev-zero":
        path.symlink_to("/dev/zero")
        return "is a symbolic link"
    with path.open("wb") as fh:  # sparse: the size is over the cap, the disk holds nothing
        fh.truncate(limit + 1)
    return "is larger than"


@pytest.mark.parametrize("variant", ["fifo", "dev-zero", "oversized"])
@pytest.mark.parametrize(("command", "name", "limit"), READS, ids=[f"{c}-{n}" for c, n, _ in READS])
def test_a_hostile_file_where_a_command_reads_is_one_line_and_no_wait(
    finished: Path, tmp_path: Path, command: str, name: str, limit: int, variant: str
) -> None:
    run_dir = _copy(finished, tmp_path, stopped=command == "resume")
    data = tmp_path / "site.npy"
    shutil.copy(finished.parent / "site.npy", data)
    target = data if name == "--data" else run_dir / name
    why = _plant(target, variant, limit)
    before = _snapshot(tmp_path)
    with FifoGuard(target) as guard:
        result = runner.invoke(app, _args(command, run_dir, data))
    assert guard.rescued == [], "the command blocked on the FIFO"
    _one_clean_line(result, str(target), why)
    assert _snapshot(tmp_path) == before  # nothing written, nothing removed


@pytest.mark.parametrize("variant", ["fifo", "dev-zero"])
def test_a_hostile_ledger_fails_the_audit_with_its_reason(
    finished: Path, tmp_path: Path, variant: str
) -> None:
    """The audit reports an unreadable ledger as a problem (exit 1), as it does an edited one."""
    run_dir = _copy(finished, tmp_path)
    target = run_dir / "ledgers" / "client-1.json"
    why = _plant(target, variant, 0)
    with FifoGuard(target) as guard:
        result = runner.invoke(app, ["audit", str(run_dir), "--json"])
    assert guard.rescued == []
    assert result.exit_code == 1
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert any(str(target) in p and why in p for p in report["problems"]), report["problems"]


def test_a_stopped_run_resumes_when_nothing_is_hostile(finished: Path, tmp_path: Path) -> None:
    """Negative control of the resume cases above (and below): the same copy, untouched, resumes."""
    run_dir = _copy(finished, tmp_path, stopped=True)
    result = runner.invoke(app, ["resume", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    assert (run_dir / "results.json").is_file() and (run_dir / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# Writers: never through a link, never over a run's records, never to an empty --out.


def test_report_never_writes_through_a_planted_link(finished: Path, tmp_path: Path) -> None:
    run_dir = _copy(finished, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (run_dir / "pi.png").symlink_to(victim)
    _one_clean_line(runner.invoke(app, ["report", str(run_dir)]), "pi.png", "symbolic link")
    assert victim.read_text() == "precious" and (run_dir / "pi.png").is_symlink()
    # Negative control: what `report` did before, matplotlib's savefig to the path, writes the
    # link's target.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    fig.savefig(run_dir / "pi.png")
    plt.close(fig)
    assert victim.read_bytes()[:4] == b"\x89PNG"


def test_keys_new_never_writes_through_a_planted_link(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "public.ckks").symlink_to(tmp_path / "victim")  # dangling: `write_bytes` would create it
    before = _snapshot(tmp_path)
    _one_clean_line(runner.invoke(app, ["keys", "new", "--out", str(keys)]), "public.ckks", "exists")
    assert _snapshot(tmp_path) == before and not (tmp_path / "victim").exists()
    (keys / "public.ckks").write_bytes(b"what the old code wrote")  # negative control: it follows
    assert (tmp_path / "victim").read_bytes() == b"what the old code wrote"


def test_keys_new_with_an_empty_out_writes_nothing_and_a_directory_gets_both_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for out in ("", "  "):
        _one_clean_line(runner.invoke(app, ["keys", "new", "--out", out]), "--out is empty")
        assert list(tmp_path.iterdir()) == []  # not the current directory
    (tmp_path / "afile").write_text("x")
    _one_clean_line(runner.invoke(app, ["keys", "new", "--out", "afile"]), "not a directory")
    # Negative control: a directory gets both files, the secret one owner-only.
    result = runner.invoke(app, ["keys", "new", "--out", "keys"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "keys" / "secret.ckks").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "keys" / "public.ckks").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["public.ckks", "secret.ckks"]
    _one_clean_line(runner.invoke(app, ["keys", "new", "--out", "keys"]), "refusing to overwrite a key")


CUT_WRITE = textwrap.dedent(
    """
    import json, resource, signal, sys
    from pathlib import Path
    from securegmi.crypto.keys import SecretContext
    from securegmi.crypto.params import CkksParameters
    from securegmi.errors import CryptoError

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    keys = SecretContext.generate(CkksParameters(max_clients=4))
    secret = keys.context.serialize(save_secret_key=True)
    root, out = Path(sys.argv[1]), {}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # RLIMIT_FSIZE bounds each file's size: one limit cuts the secret key's write, the other
    # (between the two sizes) the public one's, written second.
    assert len(keys.public_bytes) > len(secret)
    for limit in (len(secret) // 2, (len(secret) + len(keys.public_bytes)) // 2):
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            keys.save(root / str(limit))
            out[limit] = "saved"
        except CryptoError as exc:
            out[limit] = str(exc)
        # Negative control: a plain write under the same limit leaves a truncated file.
        try:
            (root / f"plain-{limit}").write_bytes(secret + keys.public_bytes)
        except OSError:
            pass
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    print(json.dumps({str(k): v for k, v in out.items()}))
    """
)


def test_a_key_write_cut_short_leaves_no_key_file(tmp_path: Path) -> None:
    """A real cut write (RLIMIT_FSIZE, as a full disk: the kernel refuses the bytes past the
    limit), in a child process so the limit binds nothing else."""
    done = subprocess.run(
        [sys.executable, "-c", CUT_WRITE, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(outcome) == 2
    for limit, message in outcome.items():
        assert "nothing was written" in message, message
        directory = tmp_path / limit
        assert list(directory.iterdir()) == [], sorted(p.name for p in directory.iterdir())
        plain = tmp_path / f"plain-{limit}"
        assert plain.stat().st_size == int(limit)  # negative control: the limit cuts plain writes


RECORDS = [
    "config.json",
    "transcript.jsonl",
    "results.json",
    "model.safetensors",
    "dp_plan.json",
    "ledgers/client-0.json",
    "ledgers/assignments.csv",
    "client-states/client-0.safetensors",
]


@pytest.mark.parametrize("record", RECORDS)
def test_infer_never_overwrites_a_runs_records(finished: Path, tmp_path: Path, record: str) -> None:
    run_dir = _copy(finished, tmp_path)
    site = finished.parent / "site.npy"
    before = _snapshot(tmp_path)
    result = runner.invoke(app, ["infer", str(run_dir), "--data", str(site), "--out", str(run_dir / record)])
    _one_clean_line(result, "records of a run directory")
    assert _snapshot(tmp_path) == before


def test_infer_out_must_be_a_file_it_may_write(
    finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    site = str(finished.parent / "site.npy")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "link.csv").symlink_to(victim)
    os.mkfifo(tmp_path / "fifo.csv")
    cases = {"": "--out is empty", ".": "is a directory", "link.csv": "symbolic link", "fifo.csv": "FIFO"}
    before = _snapshot(tmp_path)
    for out, why in cases.items():
        with FifoGuard(tmp_path / "fifo.csv") as guard:
            _one_clean_line(runner.invoke(app, ["infer", str(finished), "--data", site, "--out", out]), why)
        assert guard.rescued == []
    assert _snapshot(tmp_path) == before
    # Negative control: a new file in a directory of its own is written, one row per record.
    result = runner.invoke(app, ["infer", str(finished), "--data", site, "--out", "assign.csv"])
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "assign.csv").read_text().splitlines()) == 1 + 6


def test_overwrite_never_follows_a_linked_record_folder(finished: Path, tmp_path: Path) -> None:
    """`--overwrite` empties the record folders of the old run; one that is a link would be
    emptied wherever it points."""
    run_dir = _copy(finished, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.json").write_text("{}")
    shutil.rmtree(run_dir / "ledgers")
    (run_dir / "ledgers").symlink_to(elsewhere)
    assert [p.name for p in (run_dir / "ledgers").glob("*.json")] == ["keep.json"]  # control: reached
    before = _snapshot(tmp_path)
    args = ["simulate", "--dataset", "synthetic", "--clients", "3", "--epsilon", "4", "--out", str(run_dir)]
    _one_clean_line(runner.invoke(app, [*args, "--overwrite"]), "ledgers is a symbolic link")
    assert _snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# A failed plan leaves nothing behind; resume refuses a configuration that is not the run's.

IMPOSSIBLE = ["simulate", "--dataset", "synthetic", "--clients", "3", "--epsilon", "1e-9"]


def test_a_failed_plan_leaves_nothing_in_out(finished: Path, tmp_path: Path) -> None:
    new = tmp_path / "new"
    _one_clean_line(runner.invoke(app, [*IMPOSSIBLE, "--out", str(new)]), "too small to plan")
    assert not new.exists()
    # The same --out is then free, and a finished run under --overwrite is left whole.
    run_dir = _copy(finished, tmp_path)
    before = _snapshot(run_dir)
    _one_clean_line(runner.invoke(app, [*IMPOSSIBLE, "--out", str(run_dir), "--overwrite"]), "too small")
    assert _snapshot(run_dir) == before
    delta = ["simulate", "--dataset", "synthetic", "--clients", "3", "--epsilon", "4", "--delta", "0.5"]
    _one_clean_line(runner.invoke(app, [*delta, "--out", str(new)]), "not well below 1/n")
    assert not new.exists()


@pytest.mark.parametrize(
    "edit",
    [
        {"local_epochs": 2},
        {"dp_noise": "seeded"},
        {"epsilon": 8.0},
        {"clients": 4},
    ],
    ids=lambda e: next(iter(e)),
)
def test_resume_refuses_a_configuration_that_is_not_the_runs(
    finished: Path, tmp_path: Path, edit: dict[str, Any]
) -> None:
    run_dir = _copy(finished, tmp_path, stopped=True)
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, **edit}, indent=2))
    before = _snapshot(tmp_path)
    result = runner.invoke(app, ["resume", str(run_dir)])
    _one_clean_line(result, "not the configuration this run started with")
    assert _snapshot(tmp_path) == before  # negative control: test_a_stopped_run_resumes_when_...


def test_resume_refuses_a_state_that_records_no_configuration(finished: Path, tmp_path: Path) -> None:
    """A run started by a securegmi that kept no digest cannot be checked: refused, not trusted."""
    run_dir = _copy(finished, tmp_path, stopped=True)
    state = run_dir / "server-state.safetensors"
    data = state.read_bytes()
    arrays = st_load(data)
    n = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + n])["__metadata__"]
    del metadata["config_sha256"]
    state.write_bytes(st_save(arrays, metadata=metadata))
    _one_clean_line(runner.invoke(app, ["resume", str(run_dir)]), "records no digest")


def test_resume_refuses_a_run_that_another_version_planned(finished: Path, tmp_path: Path) -> None:
    """The configuration digest cannot see a change of design between versions: a run whose plan
    an older securegmi made (unweighted moments) is not continued under today's plan, which would
    release what its ledgers do not describe. Control: test_a_stopped_run_resumes_when_..."""
    run_dir = _copy(finished, tmp_path, stopped=True)
    plan = json.loads((run_dir / "dp_plan.json").read_text())
    del plan["statistics"]["moments_weights"]  # as a plan written before the weights
    (run_dir / "dp_plan.json").write_text(json.dumps(plan, indent=2))
    before = _snapshot(tmp_path)
    _one_clean_line(runner.invoke(app, ["resume", str(run_dir)]), "not the plan this version")
    assert _snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# securegmi.load: only documented errors, and no model with non-finite parameters.


def _rewrite_model(run_dir: Path, change: Any) -> None:
    path = run_dir / "model.safetensors"
    arrays = dict(st_load(path.read_bytes()))
    change(arrays)
    path.write_bytes(st_save(arrays))


MODEL_EDITS = {
    "no components": lambda a: a.pop("components"),
    "no pi": lambda a: a.pop("pi"),
    "components of the wrong size": lambda a: a.__setitem__("components", a["components"][:, :-1]),
    "components of the wrong count": lambda a: a.__setitem__("components", a["components"][:1]),
    "NaN in a component": lambda a: a["components"].__setitem__((0, 0), np.nan),
    "infinity in pi": lambda a: a["pi"].__setitem__((0, 0), np.inf),
    "pi of the wrong shape": lambda a: a.__setitem__("pi", a["pi"][:, :1]),
    "identifier cut short": lambda a: a.pop("stats.mean"),
    "identifier of the wrong shape": lambda a: a.__setitem__(
        "stats.cluster_given_component", a["stats.cluster_given_component"][:, :1]
    ),
    "NaN in the identifier": lambda a: a["stats.centroids"].__setitem__((0, 0), np.nan),
}


@pytest.mark.parametrize("edit", list(MODEL_EDITS))
def test_a_corrupt_model_is_a_run_directory_error(finished: Path, tmp_path: Path, edit: str) -> None:
    run_dir = _copy(finished, tmp_path)
    _rewrite_model(run_dir, MODEL_EDITS[edit])
    with pytest.raises(RunDirectoryError, match=r"model\.safetensors"):
        securegmi.load(run_dir)


@pytest.mark.parametrize(
    "edit",
    [
        {"clients": "3"},
        {"hidden": 5},
        {"dataset": "cifar"},
        {"seed": True},
        {"knob": 1},
    ],
    ids=lambda e: next(iter(e)),
)
def test_a_config_that_does_not_fit_is_a_documented_error(
    finished: Path, tmp_path: Path, edit: dict[str, Any]
) -> None:
    run_dir = _copy(finished, tmp_path)
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(SecureGMIError) as caught:
        securegmi.load(run_dir)
    assert isinstance(caught.value, RunDirectoryError | ConfigError), repr(caught.value)


def test_nan_components_would_answer_without_the_check(finished: Path) -> None:
    """Negative control of the NaN case: the model itself raises nothing for NaN parameters;
    `assign` answers with component 0 for every record. Only `load`'s check stands between."""
    model = securegmi.load(finished)
    site = np.load(finished.parent / "site.npy")
    vectors = model.components.get_component_vectors()
    vectors[:] = np.nan
    model.components.set_component_vectors(vectors)
    broken = TrainedMixture(model.components, model.training_pi, None, data_dim=model.data_dim)
    assert (broken.assign(site, pi=model.training_pi[0]) == 0).all()


# ---------------------------------------------------------------------------------------------
# Messages: Rich markup in a path is printed, not interpreted; no private size in an error.


def test_markup_in_a_path_is_printed_as_written(finished: Path, tmp_path: Path) -> None:
    run_dir = _copy(finished, tmp_path, name="run[mnist]")
    result = runner.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert f"wrote {run_dir}/pi.png" in result.output.replace("\n", "")  # Rich folds long lines
    # Negative control: printed without escaping, Rich takes "[mnist]" for a style and drops it.
    console = Console(file=io.StringIO(), width=400)
    console.print(f"wrote {run_dir}/pi.png")
    assert "[mnist]" not in console.file.getvalue()  # type: ignore[attr-defined]


def _leaks(message: str, size: int) -> bool:
    """Whether `message` shows `size` or a figure derived from it (0.1/size as the old message
    printed it), as a number of its own (not inside "100,000", say)."""
    return any(
        re.search(rf"(?<![\d.,]){re.escape(figure)}(?![\d,]|\.\d)", message)
        for figure in (str(size), f"{0.1 / size:.2g}")
    )


def test_the_delta_check_does_not_print_the_largest_clients_size() -> None:
    config = replace(CONFIG, delta=0.05)
    data = load_federated_data(config)
    largest = max(len(c.x_train) for c in data.clients)
    with pytest.raises(ConfigError, match="not well below 1/n") as caught:
        dp_plan(config, data)
    assert not _leaks(str(caught.value), largest), str(caught.value)
    # Negative control: the message before the fix is caught by the same check.
    old = (
        f"delta {config.delta:g} is not well below 1/n for the largest client (n = {largest}): it would "
        f"allow releasing a record outright. Use --delta below {0.1 / largest:.2g}, e.g. 1e-5."
    )
    assert _leaks(old, largest)


# ---------------------------------------------------------------------------------------------
# Point 6: the harness's ground truth is marked as such in results.json and metrics.jsonl.


def test_results_and_metrics_mark_the_evaluation_only_fields(finished: Path) -> None:
    results = json.loads((finished / "results.json").read_text())
    marker = results["evaluation_only"]
    assert set(marker["fields"]) == {"source_accuracy", "pi_tv_error", "nll", "per_client"}
    assert set(marker["fields"]) <= set(results) and "no client released" in marker["note"]
    rows = [json.loads(line) for line in (finished / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(set(r["evaluation_only"]["fields"]) <= set(r) for r in rows)
    assert all("source_accuracy" in r["evaluation_only"]["fields"] for r in rows)
