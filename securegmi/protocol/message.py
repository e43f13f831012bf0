"""`Message`: the only thing that crosses a client boundary, and its byte encoding.

The wire format is safetensors (arrays) with the message's metadata as JSON in the safetensors
header: no executable object serialisation, and a reader in any language can parse it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from securegmi.errors import ProtocolViolation
from securegmi.protocol.fields import (
    FIELD_TYPES,
    Ciphertext,
    DpRelease,
    Field,
    FieldKind,
    NonPrivate,
    Public,
    field_array,
    field_labels,
)

SERVER = "server"
_META_KEY = "securegmi.message"


@dataclass(frozen=True)
class Message:
    """One protocol message: a stage, a round, a sender, and either a payload or an error.

    `run` binds it to one run of a federation: the server draws a fresh id per run, every
    client answers under the id of the run it joined, and both ends refuse another run's
    messages (a replay from an earlier run, or a client of another study).

    `events` maps each ledger event a field names to that event's parameters as the sender's
    ledger records them (canonical JSON: mechanism, noise multiplier, sample rate, steps), so
    the receiving end's transcript holds what each release claims as it arrives, independent
    of the ledger files (the audit compares the two).

    `signature`: the sender's Ed25519 signature (hex) of the message's statement
    (`protocol.signed`), or empty for an unsigned message (the server's, or an older client's)."""

    stage: str
    round: int
    sender: str
    payload: Mapping[str, Field] = field(default_factory=dict)
    error: str | None = None
    run: str = ""
    events: Mapping[str, str] = field(default_factory=dict)
    signature: str = ""

    def __post_init__(self) -> None:
        for name, value in self.payload.items():
            if not isinstance(value, FIELD_TYPES):
                raise ProtocolViolation(
                    f"payload field {name!r} is a {type(value).__name__}; wrap it in Public, "
                    "NonPrivate, DpRelease or Ciphertext to declare what it discloses"
                )
        if self.error is not None and self.payload:
            raise ProtocolViolation("an error message carries no payload")
        for event_id, record in self.events.items():
            if not (isinstance(event_id, str) and isinstance(record, str) and _is_event_record(record)):
                raise ProtocolViolation(
                    f"event {event_id!r}: its parameters must be a JSON object with an 'event'"
                )
        object.__setattr__(self, "payload", MappingProxyType(dict(self.payload)))
        object.__setattr__(self, "events", MappingProxyType(dict(self.events)))


def _is_event_record(record: str) -> bool:
    try:
        parsed = json.loads(record)
    except ValueError:
        return False
    return isinstance(parsed, dict) and isinstance(parsed.get("event"), dict)


def encode(message: Message) -> bytes:
    arrays = {name: field_array(f) for name, f in message.payload.items()}
    fields = {name: field_labels(f) for name, f in message.payload.items()}
    header = {
        "stage": message.stage,
        "round": message.round,
        "sender": message.sender,
        "run": message.run,
        "error": message.error,
        "fields": fields,
        "events": dict(message.events),
    }
    if message.signature:  # an unsigned message keeps the bytes it had before signatures
        header["signature"] = message.signature
    return bytes(st_save(arrays, metadata={_META_KEY: json.dumps(header, sort_keys=True)}))


def _read_metadata(raw: bytes) -> dict[str, Any]:
    # safetensors' numpy loader drops the metadata; the header layout (8-byte little-endian
    # length, then JSON) is part of the format's specification.
    size = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8 : 8 + size]).get("__metadata__", {})
    return dict(json.loads(meta[_META_KEY]))


def decode(raw: bytes) -> Message:
    try:
        header = _read_metadata(raw)
        arrays = st_load(raw)
        fields_meta = header["fields"]
        if set(fields_meta) != set(arrays):
            raise ValueError("field metadata and arrays disagree")
        payload: dict[str, Field] = {}
        for name, meta in fields_meta.items():
            kind = FieldKind(meta["kind"])
            value = arrays[name]
            if kind is FieldKind.PUBLIC:
                payload[name] = Public(value)
            elif kind is FieldKind.NON_PRIVATE:
                payload[name] = NonPrivate(value)
            elif kind is FieldKind.DP_RELEASE:
                payload[name] = DpRelease(value, str(meta["event"]))
            else:
                event, packed_in = meta.get("event"), meta.get("packed_in")
                payload[name] = Ciphertext(
                    np.asarray(value, np.uint8).tobytes(),
                    str(meta["key_id"]),
                    None if event is None else str(event),
                    None if packed_in is None else str(packed_in),
                )
        return Message(
            str(header["stage"]),
            int(header["round"]),
            str(header["sender"]),
            payload,
            header["error"],
            str(header.get("run", "")),
            dict(header.get("events", {})),
            str(header.get("signature", "")),
        )
    except ProtocolViolation:
        raise
    except Exception as exc:  # any malformed input is a protocol violation, never a crash
        raise ProtocolViolation(f"message bytes do not decode: {exc}") from exc
