"""Wrap plain values as the field kinds a stage declares, so code that computes values never
chooses how they are labelled: the protocol does."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from securegmi.errors import ProtocolViolation
from securegmi.protocol.fields import Ciphertext, DpRelease, Field, FieldKind, NonPrivate, Public
from securegmi.protocol.spec import StageSpec


def build_payload(
    stage: StageSpec,
    values: Mapping[str, np.ndarray | bytes],
    events: Mapping[str, str] | None = None,
    key_id: str | None = None,
) -> dict[str, Field]:
    """One field per declared name; a DP release must name its covering event."""
    events = events or {}
    payload: dict[str, Field] = {}
    for spec in stage.fields:
        if spec.name not in values:
            raise ProtocolViolation(f"{stage.name}: no value for declared field {spec.name!r}")
        value = values[spec.name]
        if spec.kind is FieldKind.CIPHERTEXT:
            if not isinstance(value, bytes) or key_id is None:
                raise ProtocolViolation(f"{stage.name}: {spec.name!r} must be ciphertext bytes under a key")
            payload[spec.name] = Ciphertext(value, key_id, events.get(spec.name), spec.packed_in)
            continue
        if isinstance(value, bytes):
            raise ProtocolViolation(f"{stage.name}: {spec.name!r} is declared {spec.kind.value}, got bytes")
        if spec.kind is FieldKind.DP_RELEASE:
            if spec.name not in events:
                raise ProtocolViolation(
                    f"{stage.name}: {spec.name!r} is declared a DP release but no ledger event covers it; "
                    "a client without a privacy ledger cannot speak this protocol"
                )
            payload[spec.name] = DpRelease(value, events[spec.name])
        elif spec.kind is FieldKind.PUBLIC:
            payload[spec.name] = Public(value)
        else:
            payload[spec.name] = NonPrivate(value)
    return payload
