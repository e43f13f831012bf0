"""The only things a payload may hold (docs/design.md §5). A raw array or tensor is not a field."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from securegmi.errors import ProtocolViolation


class FieldKind(StrEnum):
    CIPHERTEXT = "ciphertext"  # CKKS bytes under a named key
    DP_RELEASE = "dp-release"  # data-derived, differentially private by itself
    PUBLIC = "public"  # data-independent: protocol constants, shapes, schedules
    NON_PRIVATE = "non-private"  # data-derived and unprotected: the audit flags every one


def _as_array(value: Any, what: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise ProtocolViolation(
            f"{what} must hold a numpy array, got {type(value).__name__}; convert tensors "
            "explicitly (t.detach().cpu().numpy()) so that what leaves is a deliberate choice"
        )
    if value.dtype.kind not in "fiub":
        raise ProtocolViolation(f"{what} must be numeric, got dtype {value.dtype}")
    # np.ascontiguousarray would turn a 0-d scalar into shape (1,)
    return value if value.flags.c_contiguous else np.ascontiguousarray(value)


@dataclass(frozen=True)
class Public:
    """A data-independent value."""

    value: np.ndarray
    kind: FieldKind = field(default=FieldKind.PUBLIC, init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", _as_array(self.value, "Public"))


@dataclass(frozen=True)
class NonPrivate:
    """A data-derived value sent without protection (the plain protocol); never silent: the
    audit reports every such field as a disclosure."""

    value: np.ndarray
    kind: FieldKind = field(default=FieldKind.NON_PRIVATE, init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", _as_array(self.value, "NonPrivate"))


@dataclass(frozen=True)
class DpRelease:
    """A data-derived value released by a DP mechanism; `event` names the ledger event that
    covers it."""

    value: np.ndarray
    event: str
    kind: FieldKind = field(default=FieldKind.DP_RELEASE, init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", _as_array(self.value, "DpRelease"))
        if not self.event:
            raise ProtocolViolation("a DpRelease must name the ledger event that covers it")


@dataclass(frozen=True)
class Ciphertext:
    """Serialised CKKS ciphertext bytes, the id of the key they are under, and the ledger event
    that makes the plaintext DP by itself (encryption is the second layer, never the only one)."""

    data: bytes
    key_id: str
    event: str | None = None
    # The field whose envelope carries these values (the protocol's `packed_in`); `data` is
    # then empty: the field is a marker that still names its own ledger event.
    packed_in: str | None = None
    kind: FieldKind = field(default=FieldKind.CIPHERTEXT, init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.data, bytes) or not self.key_id:
            raise ProtocolViolation("a Ciphertext holds bytes and a non-empty key id")
        if self.packed_in is not None and self.data:
            raise ProtocolViolation(
                f"a ciphertext packed in {self.packed_in!r} travels in that field's envelope and "
                "carries no bytes of its own"
            )


Field = Public | NonPrivate | DpRelease | Ciphertext
FIELD_TYPES = (Public, NonPrivate, DpRelease, Ciphertext)


def field_array(f: Field) -> np.ndarray:
    """The array a field puts on the wire (ciphertext bytes as uint8)."""
    if isinstance(f, Ciphertext):
        return np.frombuffer(f.data, dtype=np.uint8)
    return f.value


def field_labels(f: Field) -> dict[str, str]:
    """What a field declares about itself besides its value: kind, the ledger event and key that
    cover it, and the envelope it travels in if packed (the wire header and the transcript both
    carry these)."""
    labels = {"kind": f.kind.value}
    if isinstance(f, Ciphertext):
        labels["key_id"] = f.key_id
        if f.packed_in is not None:
            labels["packed_in"] = f.packed_in
    event = getattr(f, "event", None)
    if event is not None:
        labels["event"] = event
    return labels
