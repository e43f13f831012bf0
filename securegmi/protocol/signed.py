"""Signed messages: what a client's signature covers, and how both ends and the audit check it.

A signature covers the message's *statement*: a domain-separated canonical JSON of the
protocol's name, the run id, the round, the stage, the sender, the receiver, the error, each
payload field's labels (kind, event, key id, envelope), shape, dtype and the SHA-256 of its
bytes, and the parameters of every event the message declares. The server's transcript holds
exactly these per field (never the values), so the audit rebuilds the statement from the
transcript rows alone (`row_statement`) and checks the signature they keep: a row rewritten
in any of these, or a message replayed into another round, stage, run or protocol, no longer
verifies. Downlink (server) messages are not signed: the server holds no client key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from securegmi.crypto.signing import SignerRegistry, SigningKey, statement
from securegmi.errors import CryptoError, SignatureError
from securegmi.protocol.fields import Field, field_array, field_labels
from securegmi.protocol.message import SERVER, Message

MESSAGE_DOMAIN = "securegmi/message/v1"
_LABELS = ("kind", "key_id", "packed_in", "event")


def field_summary(f: Field) -> dict[str, Any]:
    """What the statement says of one payload field: what the transcript records of it."""
    array = field_array(f)
    return {
        **field_labels(f),
        "shape": list(array.shape),
        "dtype": str(array.dtype),
        "sha256": hashlib.sha256(array.tobytes()).hexdigest(),
    }


def _statement(
    *,
    protocol: str,
    run: str,
    round_index: int,
    stage: str,
    sender: str,
    receiver: str,
    error: str | None,
    fields: Mapping[str, Mapping[str, Any]],
    events: Mapping[str, Any],
) -> bytes:
    return statement(
        MESSAGE_DOMAIN,
        {
            "protocol": protocol,
            "run": run,
            "round": round_index,
            "stage": stage,
            "sender": sender,
            "receiver": receiver,
            "error": error,
            "fields": dict(fields),
            "events": dict(events),
        },
    )


def message_statement(message: Message, *, protocol: str, receiver: str = SERVER) -> bytes:
    """The bytes `message`'s signature covers, sent to `receiver` under `protocol`."""
    return _statement(
        protocol=protocol,
        run=message.run,
        round_index=message.round,
        stage=message.stage,
        sender=message.sender,
        receiver=receiver,
        error=message.error,
        fields={name: field_summary(f) for name, f in message.payload.items()},
        events={event: json.loads(record) for event, record in message.events.items()},
    )


def row_statement(rows: Sequence[Mapping[str, Any]], *, protocol: str) -> bytes:
    """The statement of one message rebuilt from its transcript rows (one per field, or one
    without a field): what the audit checks the rows' signature against."""
    first = rows[0]
    fields: dict[str, dict[str, Any]] = {}
    events: dict[str, Any] = {}
    for row in rows:
        name = row.get("field")
        if name is None:
            continue
        fields[str(name)] = {
            **{k: row[k] for k in _LABELS if k in row},
            "shape": row.get("shape"),
            "dtype": row.get("dtype"),
            "sha256": row.get("sha256"),
        }
        if "dp_event" in row and "event" in row:
            events[str(row["event"])] = row["dp_event"]
    return _statement(
        protocol=protocol,
        run=str(first.get("run", "")),
        round_index=int(first["round"]),
        stage=str(first.get("stage")),
        sender=str(first["sender"]),
        receiver=str(first["receiver"]),
        error=first.get("error"),
        fields=fields,
        events=events,
    )


def sign_message(message: Message, key: SigningKey, *, protocol: str, receiver: str = SERVER) -> Message:
    """`message` with `key`'s signature of its statement; `key` must be the sender's."""
    if key.client_id != message.sender:
        raise CryptoError(f"{key.client_id}'s signing key cannot sign a message from {message.sender!r}")
    signature = key.sign(message_statement(message, protocol=protocol, receiver=receiver))
    return replace(message, signature=signature)


def verify_message(
    message: Message, signers: SignerRegistry, client_id: str, *, protocol: str, receiver: str = SERVER
) -> None:
    """`SignatureError` unless `message` carries the signature of `client_id` (the client on
    whose link it arrived) under the registered key, over this protocol, run, round and stage."""
    try:
        signers.verify(
            client_id, message_statement(message, protocol=protocol, receiver=receiver), message.signature
        )
    except CryptoError as exc:
        raise SignatureError(
            f"{client_id}: its reply of round {message.round} ({message.stage}) is refused: {exc}. Only a "
            "message signed with the client's registered key is accepted (a forged, altered or replayed "
            "one is not)"
        ) from None
