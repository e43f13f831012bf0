"""The transcript: one JSON line per field of every message, metadata only, never values."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from securegmi.files import TRANSCRIPT_FILE, open_append, parse_json, read_lines
from securegmi.protocol.fields import field_array, field_labels
from securegmi.protocol.message import Message


class TranscriptWriter:
    """Appends to RUN_DIR/transcript.jsonl; each line is flushed before the message is delivered."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = open_append(path)  # a regular file only: never through a link, never a FIFO

    def record(self, message: Message, wire: bytes, *, receiver: str, status: str = "delivered") -> None:
        base = {
            "round": message.round,
            "stage": message.stage,
            "sender": message.sender,
            "receiver": receiver,
            "run": message.run,
            "status": status,
            "message_bytes": len(wire),
            "message_sha256": hashlib.sha256(wire).hexdigest(),
        }
        if message.signature:  # kept with every row of the message: the audit checks it
            base["signature"] = message.signature
        if message.error is not None or not message.payload:
            self._write({**base, "field": None, "error": message.error})
        for name, f in message.payload.items():
            array = field_array(f)
            labels = field_labels(f)
            declared = message.events.get(labels.get("event", ""))
            self._write(
                {
                    **base,
                    **labels,
                    **({} if declared is None else {"dp_event": json.loads(declared)}),
                    "field": name,
                    "shape": list(array.shape),
                    "dtype": str(array.dtype),
                    "bytes": int(array.nbytes),
                    "sha256": hashlib.sha256(array.tobytes()).hexdigest(),
                }
            )
        self._fh.flush()

    def record_refusal(self, *, round: int, stage: str, sender: str, receiver: str, reason: str) -> None:
        self._write(
            {
                "round": round,
                "stage": stage,
                "sender": sender,
                "receiver": receiver,
                "status": "refused",
                "field": None,
                "reason": reason,
            }
        )
        self._fh.flush()

    def _write(self, row: dict[str, Any]) -> None:
        self._fh.write(json.dumps(row, sort_keys=True) + "\n")

    def close(self) -> None:
        self._fh.close()


def read_transcript(path: Path) -> Iterator[dict[str, Any]]:
    """Each line's record; `RunDirectoryError` for a file that is not a regular one within the
    transcript's cap, or a line that is not JSON."""
    for line in read_lines(path, TRANSCRIPT_FILE):
        yield parse_json(line, path)
