"""The run directory: config, per-round metrics, transcript, checkpoint and results.

Files are written atomically (a fresh temporary file, then rename: `securegmi.files`) or
appended line by line, so a run that fails leaves every completed round on disk, and a write
never follows a symbolic link planted in the directory. Checkpoints are safetensors: data only,
never executable objects.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors.numpy import save

from securegmi.errors import RunDirectoryError
from securegmi.files import (
    JSON_FILE,
    KEY_FILE,
    LEDGER_FILE,
    METRICS_FILE,
    STATE_FILE,
    TRANSCRIPT_FILE,
    open_append,
    parse_json,
    read_json,
    read_lines,
    refuse_link,
    require_regular,
    write_atomic,
)

if TYPE_CHECKING:
    from securegmi.privacy.calibration import DpPlan, PrivateMixturePlan
    from securegmi.protocol import ProtocolSpec

CONFIG = "config.json"
RESULTS = "results.json"
METRICS = "metrics.jsonl"
TRANSCRIPT = "transcript.jsonl"
CHECKPOINT = "model.safetensors"
PLAN = "dp_plan.json"
PROTOCOL = "protocol.json"  # the bound ProtocolSpec that ran (ProtocolSpec.to_json), for the audit
LEDGERS = "ledgers"
CLIENT_STATES = "client-states"  # each client's pi, model copy and ledger, where it keeps them here
AGGREGATE = "aggregate.safetensors"  # the server's final broadcast as wire bytes (ciphertexts under CKKS)
ENGINE = "engine.json"  # a distributed engine's own summary (wall time, start, exchanges, refusals)
SERVER_STATE = "server-state.safetensors"  # the server's sums and run id after the last round
# A simulated run's clients' CKKS key and signing keys (a node's key dir on Flower).
CLIENT_KEYS = "client-keys"
SIGNERS = "signers.json"  # the registry of the clients' Ed25519 public keys the ceremony made

# A run's records: nothing but the run itself writes them, and no other command overwrites one.
RECORD_FILES = frozenset(
    {CONFIG, RESULTS, METRICS, TRANSCRIPT, CHECKPOINT, PLAN, PROTOCOL, AGGREGATE, ENGINE, SERVER_STATE}
    | {SIGNERS}
)
RECORD_FOLDERS = (LEDGERS, CLIENT_STATES, CLIENT_KEYS)
# Where the server's state records the digest of the configuration the run was started with.
CONFIG_DIGEST = "config_sha256"


def is_run_record(path: Path) -> bool:
    """Whether writing `path` would overwrite a record of a run directory (one that holds a
    config.json): one of its files, or anything in its ledgers, client states or keys."""
    path = Path(path)
    parent = path.parent.resolve()  # a link to the run directory is the run directory
    if path.name in RECORD_FILES and (parent / CONFIG).is_file():
        return True
    return parent.name in RECORD_FOLDERS and (parent.parent / CONFIG).is_file()


def _check_folders(path: Path) -> None:
    """A run writes only inside its own directory: a record folder (ledgers, client states, keys)
    that is a link, or not a folder, would send its files elsewhere."""
    for folder in RECORD_FOLDERS:
        try:
            mode = os.lstat(path / folder).st_mode
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(mode):
            kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a directory"
            raise RunDirectoryError(
                f"{path / folder} is {kind}: a run writes its {folder} only inside its own directory"
            )


class RunDirectory:
    def __init__(self, path: Path, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.check_unused(self.path, overwrite=overwrite)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirectoryError(f"cannot create the run directory {self.path}: {exc.strerror}") from None
        stale_files = (
            RESULTS,
            METRICS,
            TRANSCRIPT,
            CHECKPOINT,
            PLAN,
            PROTOCOL,
            AGGREGATE,
            ENGINE,
            SERVER_STATE,
            SIGNERS,
        )
        for stale in stale_files:
            try:
                (self.path / stale).unlink(missing_ok=True)  # a link is removed, never followed
            except OSError as exc:
                raise RunDirectoryError(
                    f"cannot replace {self.path / stale} ({exc.strerror}): remove it, or choose another --out"
                ) from None
        # An old client state would be restored by the new run's client: never keep one.
        for folder, pattern in (
            (LEDGERS, "*.json"),
            (CLIENT_STATES, "*.safetensors"),
            (CLIENT_KEYS, "*.ckks"),
            (CLIENT_KEYS, "*.ed25519"),
        ):
            if (self.path / folder).is_dir():
                for old in (self.path / folder).glob(pattern):
                    try:
                        old.unlink()
                    except OSError as exc:
                        raise RunDirectoryError(
                            f"cannot replace {old} ({exc.strerror}): remove it, or choose another --out"
                        ) from None

    @staticmethod
    def check_unused(path: Path, *, overwrite: bool = False) -> None:
        """`RunDirectoryError` unless a new run may be written to `path` (creating nothing): it
        is missing or an empty directory, or `overwrite` and its record folders are folders."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RunDirectoryError(f"{path} exists and is not a directory")
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise RunDirectoryError(f"{path} already holds a run; choose another --out or pass --overwrite")
        if path.exists():
            _check_folders(path)

    @classmethod
    def existing(cls, path: Path) -> RunDirectory:
        """A run directory another process has started: nothing in it is removed."""
        if not Path(path).is_dir():
            raise RunDirectoryError(f"{path} is not a run directory")
        directory = cls.__new__(cls)
        directory.path = Path(path)
        return directory

    @classmethod
    def resumable(cls, path: Path) -> RunDirectory:
        """The directory of a run that was stopped (killed, interrupted) before it finished."""
        path = Path(path)
        if not (path / CONFIG).is_file():
            raise RunDirectoryError(f"{path} holds no {CONFIG}: not a securegmi run directory")
        if os.path.lexists(path / RESULTS):
            raise RunDirectoryError(
                f"{path} is a finished run (it has {RESULTS}); there is nothing to resume"
            )
        if os.path.lexists(path / SERVER_STATE):
            require_regular(path / SERVER_STATE, STATE_FILE)  # a FIFO or link: say so, not "missing"
        if not (path / SERVER_STATE).is_file():
            raise RunDirectoryError(
                f"{path} has no {SERVER_STATE}: the run stopped before its first round was saved, or it "
                "is a method without rounds to resume; start it again with --overwrite"
            )
        _check_resumable_files(path)
        return cls.existing(path)

    def keep_metrics_before(self, next_round: int) -> list[dict[str, Any]]:
        """Keep the metrics rows of the rounds before `next_round` (a killed run may have
        written the row of a round it never saved); return them."""
        target = self.path / METRICS
        lines = list(read_lines(target, METRICS_FILE)) if os.path.lexists(target) else []
        try:
            rows = [parse_json(line, target) for line in lines]
            kept = [r for r in rows if int(r["round"]) < next_round]
        except (ValueError, KeyError, TypeError) as exc:
            raise RunDirectoryError(f"{target} is corrupt: {exc!r}") from exc
        write_atomic(target, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode())
        return kept

    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, data: Any) -> None:
        write_atomic(self.path / name, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())

    def write_public_files(self, spec: ProtocolSpec, plan: DpPlan | PrivateMixturePlan | None) -> None:
        """The protocol and DP plan beside the transcript, for the audit (every engine's run and
        a saved run of your own loop write them here)."""
        self.write_json(PROTOCOL, spec.to_json())
        if plan is not None:
            self.write_json(PLAN, plan.to_dict())
            self.file(LEDGERS).mkdir(exist_ok=True)

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open_append(self.path / METRICS) as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")

    def save_checkpoint(
        self,
        components: np.ndarray,
        pis: np.ndarray,
        metadata: dict[str, str],
        extra: dict[str, np.ndarray] | None = None,
    ) -> None:
        arrays = {"components": components, "pi": pis, **(extra or {})}
        data = save({name: np.ascontiguousarray(a) for name, a in arrays.items()}, metadata=metadata)
        write_atomic(self.path / CHECKPOINT, data, mode=0o600)


def _check_resumable_files(path: Path) -> None:
    """Every file a resumed run reads by its path through another library (safetensors, SEAL) or
    appends to is a regular file of a sane size, checked before anything opens it: a FIFO there
    would block the run, a link would redirect it."""
    _check_folders(path)
    checks = [
        (path / SERVER_STATE, STATE_FILE),
        (path / CONFIG, JSON_FILE),
        (path / TRANSCRIPT, TRANSCRIPT_FILE),
        (path / METRICS, METRICS_FILE),
    ]
    for folder, kind in ((CLIENT_STATES, STATE_FILE), (LEDGERS, LEDGER_FILE), (CLIENT_KEYS, KEY_FILE)):
        if (path / folder).is_dir():
            checks += [(p, kind) for p in sorted((path / folder).iterdir())]
    for file, kind in checks:
        if os.path.lexists(file):
            require_regular(file, kind)
    # The records the resumed run replaces at its end: a link or FIFO there is refused now, not
    # after its rounds.
    for name in sorted(RECORD_FILES - {SERVER_STATE, CONFIG, TRANSCRIPT, METRICS}):
        refuse_link(path / name)


def read_run(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """results.json and the per-round metrics of a finished run, with a clear error otherwise."""
    path = Path(path)
    results_file = path / RESULTS
    if not os.path.lexists(results_file):
        raise RunDirectoryError(f"{path} has no {RESULTS}: not a finished securegmi run directory")
    results = read_json(results_file, JSON_FILE)
    metrics_file = path / METRICS
    metrics = (
        [parse_json(line, metrics_file) for line in read_lines(metrics_file, METRICS_FILE)]
        if os.path.lexists(metrics_file)
        else []
    )
    if not isinstance(results, dict) or not all(isinstance(m, dict) for m in metrics):
        raise RunDirectoryError(f"{path}: corrupt run file ({RESULTS} or {METRICS} does not hold records)")
    return results, metrics
