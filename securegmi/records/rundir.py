"""The run directory: config, per-round metrics, transcript, checkpoint and results.

Files are written atomically (temporary file, then rename) or appended line by line, so a run
that fails leaves every completed round on disk. Checkpoints are safetensors: data only, never
executable objects.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from securegmi.errors import RunDirectoryError

CONFIG = "config.json"
RESULTS = "results.json"
METRICS = "metrics.jsonl"
TRANSCRIPT = "transcript.jsonl"
CHECKPOINT = "model.safetensors"
PLAN = "dp_plan.json"
PROTOCOL = "protocol.json"  # the protocol's name and bound dimensions, for the audit
LEDGERS = "ledgers"
CLIENT_STATES = "client-states"  # each client's pi, model copy and ledger, where it keeps them here
AGGREGATE = "aggregate.safetensors"  # the server's final broadcast as wire bytes (ciphertexts under CKKS)
ENGINE = "engine.json"  # a distributed engine's own summary (wall time, start, exchanges, refusals)
SERVER_STATE = "server-state.safetensors"  # the server's sums and run id after the last round
CLIENT_KEYS = "client-keys"  # a simulated secure run's clients' CKKS key (a node's key dir on Flower)


class RunDirectory:
    def __init__(self, path: Path, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise RunDirectoryError(f"{self.path} exists and is not a directory")
        if self.path.exists() and any(self.path.iterdir()) and not overwrite:
            raise RunDirectoryError(
                f"{self.path} already holds a run; choose another --out or pass --overwrite"
            )
        self.path.mkdir(parents=True, exist_ok=True)
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
        )
        for stale in stale_files:
            (self.path / stale).unlink(missing_ok=True)
        # An old client state would be restored by the new run's client: never keep one.
        for folder, pattern in (
            (LEDGERS, "*.json"),
            (CLIENT_STATES, "*.safetensors"),
            (CLIENT_KEYS, "*.ckks"),
        ):
            if (self.path / folder).is_dir():
                for old in (self.path / folder).glob(pattern):
                    old.unlink()

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
        if (path / RESULTS).exists():
            raise RunDirectoryError(
                f"{path} is a finished run (it has {RESULTS}); there is nothing to resume"
            )
        if not (path / SERVER_STATE).is_file():
            raise RunDirectoryError(
                f"{path} has no {SERVER_STATE}: the run stopped before its first round was saved, or it "
                "is a method without rounds to resume; start it again with --overwrite"
            )
        return cls.existing(path)

    def keep_metrics_before(self, next_round: int) -> list[dict[str, Any]]:
        """Keep the metrics rows of the rounds before `next_round` (a killed run may have
        written the row of a round it never saved); return them."""
        target = self.path / METRICS
        lines = target.read_text(encoding="utf-8").splitlines() if target.exists() else []
        try:
            rows = [json.loads(line) for line in lines if line.strip()]
            kept = [r for r in rows if int(r["round"]) < next_round]
        except (ValueError, KeyError, TypeError) as exc:
            raise RunDirectoryError(f"{target} is corrupt: {exc}") from exc
        tmp = target.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, target)
        return kept

    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, data: Any) -> None:
        target = self.path / name
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, target)

    def append_metrics(self, row: dict[str, Any]) -> None:
        with (self.path / METRICS).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")

    def save_checkpoint(
        self,
        components: np.ndarray,
        pis: np.ndarray,
        metadata: dict[str, str],
        extra: dict[str, np.ndarray] | None = None,
    ) -> None:
        target = self.path / CHECKPOINT
        tmp = target.with_suffix(".tmp")
        arrays = {"components": components, "pi": pis, **(extra or {})}
        save_file(
            {name: np.ascontiguousarray(a) for name, a in arrays.items()},
            str(tmp),
            metadata=metadata,
        )
        os.replace(tmp, target)


def read_run(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """results.json and the per-round metrics of a finished run, with a clear error otherwise."""
    path = Path(path)
    results_file = path / RESULTS
    if not results_file.exists():
        raise RunDirectoryError(f"{path} has no {RESULTS}: not a finished securegmi run directory")
    try:
        results = json.loads(results_file.read_text(encoding="utf-8"))
        metrics_file = path / METRICS
        metrics = (
            [
                json.loads(line)
                for line in metrics_file.read_text(encoding="utf-8").splitlines()
                if line.strip()
            ]
            if metrics_file.exists()
            else []
        )
    except json.JSONDecodeError as exc:
        raise RunDirectoryError(f"{path}: corrupt run file ({exc})") from exc
    return results, metrics
