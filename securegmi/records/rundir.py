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
ENGINE = "engine.json"  # a distributed engine's own summary (wall time, refusals per round)


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
        for stale in (RESULTS, METRICS, TRANSCRIPT, CHECKPOINT, PLAN, PROTOCOL, AGGREGATE, ENGINE):
            (self.path / stale).unlink(missing_ok=True)
        # An old client state would be restored by the new run's client: never keep one.
        for folder, pattern in ((LEDGERS, "*.json"), (CLIENT_STATES, "*.safetensors")):
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
